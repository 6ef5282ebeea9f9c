"""Examples, the data-file readers (ERASER, HateXplain, SST-2, any labelled table, HuggingFace datasets) and the
built-in tasks whose deciding tokens are known. Below the model layer: nothing here imports torch or the model,
and pandas only when a table is read.

    movies = read_eraser("../shared/data/eraser_movies", "test", max_tokens=512)   # a LoadedSplit
    hate = read_hatexplain("../shared/data/hatexplain", "val")
    sst = read_sst2("../shared/data/sst2", "dev")
    loaded = read_labelled("reviews.csv", text_col="text", label_col="label")     # what --data accepts

Each reader turns one split into `Example`s (text = whitespace-separated tokens, label = class index,
rationale = one 0/1 per token) and returns `LoadedSplit(examples, label_names, info)`; `info` records what
the reader did. Label names are sorted as `read_table` sorts them (numerically when all are integers); pass a
training split's `label_names` to index another split the same way.
"""
from attnaudit.data.eraser import read_eraser
from attnaudit.data.examples import Example, read_table, read_texts, sorted_labels, write_jsonl
from attnaudit.data.hatexplain import HATEXPLAIN_RULES, read_hatexplain
from attnaudit.data.hf_datasets import from_hf_dataset
from attnaudit.data.labelled import data_format, read_labelled
from attnaudit.data.labels import parse_label_names
from attnaudit.data.parallel import GoldAlignment, ParallelFormatError, read_alignments, read_parallel, write_parallel
from attnaudit.data.prompts import read_prompts
from attnaudit.data.splits import LoadedSplit, split_stats
from attnaudit.data.sst2 import read_sst2
from attnaudit.data.tasks import TASK_NAMES, get_task, make_examples

__all__ = ["Example", "LoadedSplit", "read_eraser", "read_hatexplain", "read_sst2", "read_labelled", "data_format",
           "from_hf_dataset", "read_table", "read_texts", "write_jsonl", "split_stats", "sorted_labels",
           "HATEXPLAIN_RULES", "parse_label_names", "TASK_NAMES", "get_task", "make_examples", "GoldAlignment",
           "ParallelFormatError", "read_alignments", "read_parallel", "write_parallel", "read_prompts"]
