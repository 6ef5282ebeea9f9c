"""Examples, the data-file readers (ERASER, HateXplain, SST-2, any labelled table) and the built-in tasks whose
deciding tokens are known. Below the model layer: nothing here imports torch or the model."""
