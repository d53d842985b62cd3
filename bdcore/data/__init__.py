"""Datasets as in-memory tensors, their loaders, the defender's clean subset and augmentation."""
from bdcore.data.augment import Normalizer, augment_batch, iterate_batches, random_crop, random_hflip
from bdcore.data.base import DatasetError, DatasetInfo, DatasetSplits, DefenderData, ImageSet
from bdcore.data.defender import defender_subset
from bdcore.data.registry import (
    DATASETS,
    check_dataset_folder,
    dataset_names,
    dataset_root,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS", "DatasetError", "check_dataset_folder", "dataset_root", "DatasetInfo", "DatasetSplits",
    "DefenderData", "ImageSet",
    "Normalizer", "augment_batch", "dataset_names", "defender_subset", "iterate_batches",
    "load_dataset", "random_crop", "random_hflip", "register_dataset",
]
