"""Datasets, transforms and samplers: files on disk -> normalized crops and labels.

Raw datasets (`ADE20K`, `Cityscapes`, `PascalContext`, `PascalContext59`, `FolderSegmentation`,
`SyntheticSegmentation`, or `build_dataset`; the named ones are described in `catalog`)
yield (image uint8 (H, W, 3) RGB, label int64 (H, W), name). `TrainSamples` applies mmseg's
training pipeline (each dataset's config sets its scale and crop) by global sample position,
`PositionSampler` hands each rank its positions, `EvalSamples` applies the test pipeline.

The datasets import no torch; the samplers and transforms (which do) are imported on first use
(PEP 562), so that reading files or class names stays light.
"""
import importlib

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from .catalog import NAMED_DATASETS
from .datasets import (ADE20K, DATASETS, Cityscapes, DataError, FolderSegmentation, PascalContext,
                       PascalContext59, build_dataset, random_palette, read_image, read_label)
from .synthetic import SyntheticSegmentation

_TORCH_HOMES = {"EvalSamples": "samples", "PositionSampler": "samples", "TrainSamples": "samples",
                "MEAN": "transforms", "STD": "transforms", "check_crop_size": "transforms",
                "eval_transform": "transforms", "train_transform": "transforms"}

__all__ = [
    "MEAN", "STD", "ADE20K_CLASSES", "ADE20K_PALETTE",
    "DataError", "read_image", "read_label", "random_palette",
    "ADE20K", "Cityscapes", "PascalContext", "PascalContext59", "NAMED_DATASETS",
    "FolderSegmentation", "SyntheticSegmentation", "DATASETS", "build_dataset",
    "TrainSamples", "PositionSampler", "EvalSamples",
    "check_crop_size", "train_transform", "eval_transform",
]


def __getattr__(name):
    if name not in _TORCH_HOMES:
        raise AttributeError(f"module 'setr.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_TORCH_HOMES[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
