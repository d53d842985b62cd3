"""Analyses of trained models: how separable poison samples are in latent space (separation.py)."""
from bdcore.analysis.separation import (
    SeparationScore,
    final_linear,
    latent_features,
    poison_separation,
    separation_score,
)

__all__ = ["SeparationScore", "final_linear", "latent_features", "poison_separation", "separation_score"]
