"""The named datasets (`--dataset NAME`): classes, palette, label rule, and the test settings of the
configs that train SETR on them: the one place train/config.py's presets, setr.evaluate and
setr.predict take them from. Plain Python (no torch, numpy or PIL): `--help` reads it.

Test settings (ignore_index 255 everywhere):
    ade20k            mmseg configs/_base_/datasets/ade20k.py + setr_vit-l_*_ade20k-512x512.py:
                      keep-ratio resize into (2048, 512), slide 512 / stride 341
    cityscapes        mmseg configs/_base_/datasets/cityscapes_768x768.py + setr_vit-l_*_cityscapes-768x768.py:
                      keep-ratio resize into (2049, 1025) (the 768 base config's scale, not the
                      (2048, 1024) of cityscapes.py: a 2048x1024 image is tested at 2049x1025),
                      slide 768 / stride 512
    pascal_context    fudan-zvg/SETR (commit 0acc258) configs/_base_/datasets/pascal_context.py +
                      SETR_*_480x480_80k_pascal_context_bs_16.py: its Resize(dataset='pascal_context')
                      sets the short side to 520, at least the 480 crop (short_min): a 375x500 image
                      is tested at 520x693; slide 480 / stride 320
    pascal_context59  mmseg configs/_base_/datasets/pascal_context_59.py (mmseg has no SETR config for
                      it): keep-ratio resize into (520, 520) (375x500 -> 390x520), slide 480 / stride 320
ms+flip is ratios 0.5-1.75 + flip everywhere: each ratio r gives the scale (int(r * s) for s in
scale) (mmseg 0.x MultiScaleFlipAug, whose `--aug-test` scored the released checkpoints), resized
into by the same rule as single scale: keep-ratio, or for pascal_context (its `*_MS.py` configs'
Resize(multi_scale_test=True)) short side max(int(520 r), 480).
"""
from dataclasses import dataclass
from typing import Tuple

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from .cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from .pascal_context import (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE, PASCAL_CONTEXT_CLASSES,
                             PASCAL_CONTEXT_PALETTE)

IGNORE_INDEX = 255


@dataclass(frozen=True)
class TestSettings:
    """A config's test pipeline: keep-ratio resize into `scale` (long, short), slide windows of
    `crop_size` at `stride`; short_min > 0: the SETR repository's short-side rule instead of the
    keep-ratio resize, at single scale and ms+flip (setr.data.transforms.eval_size)."""
    scale: Tuple[int, int]
    crop_size: int
    stride: int
    short_min: int = 0


@dataclass(frozen=True)
class NamedDataset:
    title: str
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    reduce_zero_label: bool  # raw label 0 -> ignored, k -> k - 1
    test: TestSettings
    root: str  # what --data-root names

    @property
    def num_classes(self):
        return len(self.classes)


_PASCAL_ROOT = "the VOCdevkit/VOC2010 folder, with mmseg's SegmentationClassContext labels"

NAMED_DATASETS = {
    "ade20k": NamedDataset("ADE20K", ADE20K_CLASSES, ADE20K_PALETTE, True,
                           TestSettings(scale=(2048, 512), crop_size=512, stride=341),
                           "the ADEChallengeData2016 folder"),
    "cityscapes": NamedDataset("Cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, False,
                               TestSettings(scale=(2049, 1025), crop_size=768, stride=512),
                               "the folder holding leftImg8bit/ and gtFine/"),
    "pascal_context": NamedDataset("Pascal Context (60 classes)", PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE,
                                   False, TestSettings(scale=(520, 520), crop_size=480, stride=320, short_min=480),
                                   _PASCAL_ROOT),
    "pascal_context59": NamedDataset("Pascal Context 59", PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE,
                                     True, TestSettings(scale=(520, 520), crop_size=480, stride=320),
                                     _PASCAL_ROOT),
}


def dataset_with_classes(num_classes):
    """The name of the one named dataset with `num_classes` classes (None if none or several): what
    a plain mmseg checkpoint, which does not say its dataset, was most likely trained on."""
    names = [n for n, d in NAMED_DATASETS.items() if d.num_classes == num_classes]
    return names[0] if len(names) == 1 else None


def short_min_of(saved_eval, test):
    """The short_min of a checkpoint's test resize (TestSettings): its export's evaluation settings'
    (`saved_eval`, the dict training saves), else its dataset's (`test`, TestSettings or None), else 0."""
    if "short_min" in saved_eval:
        return int(saved_eval["short_min"])
    return test.short_min if test else 0
