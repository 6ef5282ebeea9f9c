"""The lecture's Transformer, its hook sites, built-in tasks, training and the model interface."""
from attnaudit.model.checkpoint import load_model, save_checkpoint
from attnaudit.model.data import Example
from attnaudit.model.datasets import read_eraser, read_hatexplain, read_labelled, read_sst2
from attnaudit.model.hooks import Cache, HookPoint, hooks, record, recording
from attnaudit.model.interface import Batch, TextClassifier
from attnaudit.model.seq2seq import Translator
from attnaudit.model.tasks import TASK_NAMES, get_task, make_examples
from attnaudit.model.transformer import TransformerClassifier, TransformerConfig, TransformerSeq2Seq

__all__ = ["load_model", "save_checkpoint", "Example", "Batch", "TextClassifier", "Translator", "Cache", "HookPoint",
           "hooks", "record", "recording", "TASK_NAMES", "get_task", "make_examples", "TransformerClassifier",
           "TransformerConfig", "TransformerSeq2Seq", "read_eraser", "read_hatexplain", "read_labelled", "read_sst2"]
