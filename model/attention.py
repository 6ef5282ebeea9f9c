"""Multi-head scaled dot-product attention, written out (Vaswani et al. 2017, section 3.2).

Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k)·V;  MultiHead = Concat(head_1..head_h)·W^O with
head_i = Attention(Q·W_i^Q, K·W_i^K, V·W_i^V). There is no fused kernel on this path: explainers need
the probabilities, and every one passes through the `pattern` hook site.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnaudit.model.hooks import HookPoint
from attnaudit.model.precision import attention_softmax


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads; got d_model={d_model}, n_heads={n_heads}.")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)   # the h matrices W_i^Q side by side
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)   # W^O
        self.dropout = nn.Dropout(dropout)
        self.pattern = HookPoint()               # site <prefix>.pattern: [batch, head, query, key]
        self.values = HookPoint()                # site <prefix>.values: [batch, head, key, d_head]

    def forward(self, x_q: Tensor, x_kv: Tensor, allowed: Tensor) -> Tensor:
        """x_q [batch, query, d_model], x_kv [batch, key, d_model], allowed [batch, 1, query, key] bool."""
        b, n_q, _ = x_q.shape
        n_k = x_kv.shape[1]
        q = self.w_q(x_q).view(b, n_q, self.n_heads, self.d_head)                # [batch, query, head, d_head]
        k = self.w_k(x_kv).view(b, n_k, self.n_heads, self.d_head)               # [batch, key, head, d_head]
        v = self.w_v(x_kv).view(b, n_k, self.n_heads, self.d_head)               # [batch, key, head, d_head]
        v = self.values(v.transpose(1, 2), allowed)                              # [batch, head, key, d_head]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)  # [batch, head, query, key]
        scores = scores.masked_fill(~allowed, float("-inf"))                     # masked keys: exp(-inf) = 0
        scores = scores.masked_fill(~allowed.any(-1, keepdim=True), 0.0)         # padded queries: no NaN rows
        pattern = attention_softmax(scores) * allowed                            # padded query rows exactly 0; fp32
        pattern = self.pattern(pattern, allowed)                                 # [batch, head, query, key]
        ctx = torch.einsum("bhqk,bhkd->bqhd", self.dropout(pattern), v)          # [batch, query, head, d_head]
        return self.w_o(ctx.reshape(b, n_q, self.n_heads * self.d_head))         # [batch, query, d_model]

    def output_weight(self) -> Tensor:
        """W^O split by head -> [d_model, head, d_head]: head h's value v maps to W^O[:, h] @ v."""
        return self.w_o.weight.view(-1, self.n_heads, self.d_head)
