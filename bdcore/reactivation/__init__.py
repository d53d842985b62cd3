"""Dormant backdoors: the backdoor existence coefficient (BEC) and re-activation attacks (white-box,
query-based, transfer-based) that measure what a defense left behind (Zhu et al., NeurIPS 2024).

Analyses are registered by name, one module each (bec.py, whitebox.py, query.py, transfer.py);
`bdcore.reactivation.cells.run_analysis_cell` runs one on saved attack and defense artifacts.
"""
from bdcore.reactivation.base import (
    ANALYSES,
    Analysis,
    AnalysisConfig,
    AnalysisContext,
    NotApplicable,
    PoisonedSamples,
    analysis_config,
    analysis_names,
    build_analysis,
    perturbed_asr,
    reactivation_loss,
    register_analysis,
)

__all__ = ["ANALYSES", "Analysis", "AnalysisConfig", "AnalysisContext", "NotApplicable", "PoisonedSamples", "analysis_config",
           "analysis_names", "build_analysis", "perturbed_asr", "reactivation_loss", "register_analysis"]
