"""Analyses: perturbation faithfulness, counterfactual attention tests, sanity checks, plausibility, statistics, reports."""
from attnaudit.analyses.audit import AuditResult, AuditSettings, audit
from attnaudit.analyses.counterfactual import counterfactual_table
from attnaudit.analyses.plausibility import gold_table, rationale_table
from attnaudit.analyses.report import load_results, render_report, write_report
from attnaudit.analyses.sanity import cascading_layers, randomization_table, randomization_verdict
from attnaudit.analyses.seq2seq import audit_translator
from attnaudit.analyses.stats import paired_comparisons
from attnaudit.analyses.tables import faithfulness_table, load_tables, save_tables, summarize
from attnaudit.analyses.verdict import Verdict, derive_verdict
from attnaudit.explain.perturb import PerturbationEngine

__all__ = ["audit", "AuditSettings", "AuditResult", "PerturbationEngine", "faithfulness_table", "summarize",
           "paired_comparisons", "save_tables", "load_tables", "counterfactual_table", "gold_table", "rationale_table",
           "randomization_table", "randomization_verdict", "cascading_layers", "audit_translator", "write_report",
           "render_report", "load_results", "derive_verdict", "Verdict", "ItemStore", "check_output_dir",
           "interruptible", "frame_payload", "payload_frame"]

# Job infrastructure moved to attnaudit.jobs.store (it belongs to the jobs layer, above the analyses); these
# names still resolve here for code written against 0.1, with a DeprecationWarning. To be removed in 0.3.
_MOVED = {"ItemStore", "check_output_dir", "interruptible", "frame_payload", "payload_frame"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"attnaudit.analyses.{name} moved to attnaudit.jobs.store.{name}; import it from there "
                      "(the old name goes in 0.3).", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("attnaudit.jobs.store"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
