"""The lecture's Transformer, its hook sites, training and the model interface (built-in tasks and data readers
live in `attnaudit.data`; their names are re-exported here).

Names are imported on first use (module `__getattr__`), so `import attnaudit.model` or the CLI's
`--help` does not pay for torch, safetensors or pandas.
"""
import importlib

_NAMES = {
    "load_model": "checkpoint", "save_checkpoint": "checkpoint", "Example": "attnaudit.data.examples",
    "read_eraser": "attnaudit.data", "read_hatexplain": "attnaudit.data",
    "read_labelled": "attnaudit.data", "read_sst2": "attnaudit.data",
    "Cache": "hooks", "HookPoint": "hooks", "hooks": "hooks", "record": "hooks", "recording": "hooks",
    "Batch": "interface", "TextClassifier": "interface", "Translator": "seq2seq",
    "TASK_NAMES": "attnaudit.data.tasks", "get_task": "attnaudit.data.tasks", "make_examples": "attnaudit.data.tasks",
    "TransformerClassifier": "transformer", "TransformerConfig": "transformer", "TransformerSeq2Seq": "transformer",
    "HFTranslator": "hf_seq2seq", "load_hf_seq2seq": "hf_seq2seq", "SEQ2SEQ_SUPPORTED": "hf_seq2seq",
    "step_batch": "steps",
}

__all__ = ["load_model", "save_checkpoint", "Example", "Batch", "TextClassifier", "Translator", "Cache", "HookPoint",
           "hooks", "record", "recording", "TASK_NAMES", "get_task", "make_examples", "TransformerClassifier",
           "TransformerConfig", "TransformerSeq2Seq", "read_eraser", "read_hatexplain", "read_labelled", "read_sst2",
           "HFTranslator", "load_hf_seq2seq", "SEQ2SEQ_SUPPORTED", "step_batch"]


def __getattr__(name: str):
    if name in _NAMES:
        module = _NAMES[name] if "." in _NAMES[name] else f"{__name__}.{_NAMES[name]}"
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value                  # later look-ups skip this function
        return value
    try:                                         # attnaudit.model.fit etc. after a bare `import attnaudit.model`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":       # the submodule exists but needs something missing
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(__all__))
