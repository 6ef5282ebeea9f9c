"""The bottom layer: helpers every other layer may use and that use none of them (files, JSON, hashes, progress,
ranking). Nothing here imports torch at module level."""
