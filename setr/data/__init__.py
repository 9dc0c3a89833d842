"""Datasets, transforms and samplers: files on disk -> normalized crops and labels.

Raw datasets (`ADE20K`, `Cityscapes`, `PascalContext`, `PascalContext59`, `FolderSegmentation`,
`SyntheticSegmentation`, or `build_dataset`; the named ones are described in `catalog`)
yield (image uint8 (H, W, 3) RGB, label int64 (H, W), name). `TrainSamples` applies mmseg's
training pipeline (each dataset's config sets its scale and crop) by global sample position,
`PositionSampler` hands each rank its positions, `EvalSamples` applies the test pipeline.
"""

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from .catalog import NAMED_DATASETS
from .datasets import (ADE20K, Cityscapes, DataError, FolderSegmentation, PascalContext, PascalContext59,
                       build_dataset, random_palette, read_image, read_label)
from .samples import EvalSamples, PositionSampler, TrainSamples
from .synthetic import SyntheticSegmentation
from .transforms import MEAN, STD, check_crop_size, eval_transform, train_transform

__all__ = [
    "MEAN", "STD", "ADE20K_CLASSES", "ADE20K_PALETTE",
    "DataError", "read_image", "read_label", "random_palette",
    "ADE20K", "Cityscapes", "PascalContext", "PascalContext59", "NAMED_DATASETS",
    "FolderSegmentation", "SyntheticSegmentation", "build_dataset",
    "TrainSamples", "PositionSampler", "EvalSamples",
    "check_crop_size", "train_transform", "eval_transform",
]
