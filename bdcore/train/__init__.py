"""Training: BackdoorBench's defaults, in-memory batches, AMP on CUDA, checkpoint/resume."""
from bdcore.train.config import DEFAULT_EPOCHS, TrainConfig, default_train_config
from bdcore.train.loop import (
    Checkpointer,
    StepContext,
    TrainResult,
    TrainStep,
    cross_entropy_step,
    seed_everything,
    to_model_input,
    train_model,
)

__all__ = [
    "Checkpointer", "DEFAULT_EPOCHS", "StepContext", "TrainConfig", "TrainResult", "TrainStep",
    "cross_entropy_step", "default_train_config", "seed_everything", "to_model_input", "train_model",
]
