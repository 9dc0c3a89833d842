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
    pascal_context    fudan-zvg/SETR configs/_base_/datasets/pascal_context.py + SETR_*_480x480_80k_pascal_context*.py
    pascal_context59  (mmseg has no SETR config for it): keep-ratio resize into (520, 520), slide 480 / stride 320
ms+flip is ratios 0.5-1.75 + flip everywhere. mmseg's (ade20k, cityscapes: the 0.x `--aug-test` that
scored the released checkpoints) rescales keep-ratio into (ratio * scale); SETR's `*_MS.py` configs
(pascal_context*) use `Resize(setr_multi_scale=True)`: the short side becomes
max(int(ratio * 520), 480), the crop size (`aug_short_min`).
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
    `crop_size` at `stride`; for ms+flip, `aug_short_min` > 0 picks SETR's multi-scale rule."""
    scale: Tuple[int, int]
    crop_size: int
    stride: int
    aug_short_min: int = 0


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


_PASCAL_TEST = TestSettings(scale=(520, 520), crop_size=480, stride=320, aug_short_min=480)
_PASCAL_ROOT = "the VOCdevkit/VOC2010 folder, with mmseg's SegmentationClassContext labels"

NAMED_DATASETS = {
    "ade20k": NamedDataset("ADE20K", ADE20K_CLASSES, ADE20K_PALETTE, True,
                           TestSettings(scale=(2048, 512), crop_size=512, stride=341),
                           "the ADEChallengeData2016 folder"),
    "cityscapes": NamedDataset("Cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, False,
                               TestSettings(scale=(2049, 1025), crop_size=768, stride=512),
                               "the folder holding leftImg8bit/ and gtFine/"),
    "pascal_context": NamedDataset("Pascal Context (60 classes)", PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE,
                                   False, _PASCAL_TEST, _PASCAL_ROOT),
    "pascal_context59": NamedDataset("Pascal Context 59", PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE,
                                     True, _PASCAL_TEST, _PASCAL_ROOT),
}


def dataset_with_classes(num_classes):
    """The name of the one named dataset with `num_classes` classes (None if none or several): what
    a plain mmseg checkpoint, which does not say its dataset, was most likely trained on."""
    names = [n for n, d in NAMED_DATASETS.items() if d.num_classes == num_classes]
    return names[0] if len(names) == 1 else None
