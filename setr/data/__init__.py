"""Datasets, transforms and samplers: files on disk -> normalized crops and labels.

Raw datasets (`ADE20K`, `FolderSegmentation`, `SyntheticSegmentation`, or `build_dataset`)
yield (image uint8 (H, W, 3) RGB, label int64 (H, W), name). `TrainSamples` applies mmseg's
ADE20K training pipeline by global sample position, `PositionSampler` hands each rank its
positions, `EvalSamples` applies the test pipeline.
"""

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from .datasets import (ADE20K, DataError, FolderSegmentation, build_dataset, random_palette,
                       read_image, read_label)
from .samples import EvalSamples, PositionSampler, TrainSamples
from .synthetic import SyntheticSegmentation
from .transforms import MEAN, STD, check_crop_size, eval_transform, train_transform

__all__ = [
    "MEAN", "STD", "ADE20K_CLASSES", "ADE20K_PALETTE",
    "DataError", "read_image", "read_label", "random_palette",
    "ADE20K", "FolderSegmentation", "SyntheticSegmentation", "build_dataset",
    "TrainSamples", "PositionSampler", "EvalSamples",
    "check_crop_size", "train_transform", "eval_transform",
]
