"""Sinusoidal positional encoding (Vaswani et al. 2017, section 3.5).

PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """The table PE[pos, dim] -> [n_positions, d_model] (float32)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]                 # [pos, 1]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)                     # [d_model/2]
    angle = pos / torch.pow(10000.0, two_i / d_model)                            # [pos, d_model/2]
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])                         # odd d_model: one fewer cos
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds PE to scaled token embeddings: x·√d_model + PE (the paper scales embeddings by √d_model)."""

    table: Tensor                       # [max_len, d_model], a buffer (not saved: it is recomputed)

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, embeds: Tensor) -> Tensor:
        seq = embeds.shape[1]
        if seq > self.max_len:
            raise ValueError(
                f"sequence length must be at most max_len={self.max_len}; got {seq} tokens. "
                f"Truncate the input or train a model with a larger max_len."
            )
        return embeds * math.sqrt(self.d_model) + self.table[:seq].to(embeds.dtype)  # [batch, seq, d_model]
