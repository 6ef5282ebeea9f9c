"""The package version: one definition, read by the top-level package, reports and rank fingerprints."""
__version__ = "0.1.0"
