"""bdcore: the attack/defense engine of backdoor-learning research, in plain PyTorch.

Public API: datasets (`bdcore.data`), models (`bdcore.models`), training (`bdcore.train`),
attacks (`bdcore.attacks`), defenses (`bdcore.defenses`), metrics (`bdcore.metrics`),
artifacts (`bdcore.artifacts`) and whole cells (`bdcore.cells`).
"""
__version__ = "0.1.0"
