"""Image and label transforms: mmsegmentation's train and test pipelines (numpy, OpenCV).

Images are uint8 (H, W, 3) RGB numpy arrays, labels (H, W) non-negative integer arrays, until
`normalize_pad` turns them into the tensors the model eats. Randomness comes from an explicit
`numpy.random.Generator`, drawn in the same order and from the same distributions as mmseg's
transforms draw from numpy's global RNG:

    train: rescale (ratio 0.5-2.0 of the scale, keep ratio) -> random crop (cat_max_ratio 0.75)
           -> horizontal flip 0.5 -> photometric distortion -> normalize -> pad to the crop
    test:  rescale into the scale, keep ratio (the SETR repository's Pascal Context: short side
           at least short_min, `eval_size`) -> normalize
The ADE20K configs' scale is (2048, 512) (the defaults here), Cityscapes 768x768's (2049, 1025),
Pascal Context's (520, 520): the pipelines are otherwise the same (setr.data.catalog).

Resizing and colour conversions go through OpenCV exactly as mmcv calls it (backend 'cv2'):
cv2.resize INTER_LINEAR for images, INTER_NEAREST for labels, cv2.cvtColor for the photometric
distortion's uint8 HSV round trips. An RGB image converted with the RGB codes gives the same
numbers as mmcv's BGR codes on the BGR image.
"""

import cv2
import numpy as np
import torch

from setr.constants import PATCH_SIZE

# ImageNet mean / std of RGB images on the 0-255 scale (mmseg's ADE20K config).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def to_pair(value, name="size"):
    """An int or a 2-sequence -> (a, b) of ints."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def check_crop_size(crop_size, patch_size=PATCH_SIZE, name="crop_size"):
    """(h, w) of a crop whose sides are positive multiples of the ViT patch size."""
    h, w = to_pair(crop_size, name)
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"{name} must be positive multiples of the patch size {patch_size} "
                         f"(the ViT tokenizes {patch_size}x{patch_size} patches), got {(h, w)}")
    return h, w


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------

def rescale_size(height, width, scale):
    """mmcv.rescale_size: the (h, w) that fits (height, width) into `scale` keeping the ratio.

    `scale` is a pair of edges (in mmseg (2048, 512) = (long, short)); the factor is the largest
    one with long side <= max(scale) and short side <= min(scale).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_image(image, size):
    """mmcv.imresize(interpolation='bilinear', backend='cv2'): cv2.resize INTER_LINEAR.

    image: (H, W, 3) uint8; size: (h, w). Returns (h, w, 3) uint8.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


def resize_label(label, size):
    """mmcv.imresize(interpolation='nearest', backend='cv2'): cv2.resize INTER_NEAREST.

    label: (H, W) integer array; size: (h, w). Returns (h, w), same dtype.
    """
    h, w = size
    if label.shape == (h, w):
        return label
    # cv2 resizes 8/16/32-bit integers; labels are 8-bit PNGs, so uint8 unless a value is larger.
    work = np.uint8 if label.dtype == np.uint8 or int(label.max(initial=0)) < 256 else np.int32
    out = cv2.resize(np.ascontiguousarray(label, dtype=work), (w, h), interpolation=cv2.INTER_NEAREST)
    return out.astype(label.dtype, copy=False)


def random_rescale(image, label, rng, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

    ratio ~ U(ratio_range); target scale = (int(scale[0] * ratio), int(scale[1] * ratio));
    then keep-ratio rescale into it (image bilinear, label nearest).
    """
    lo, hi = ratio_range
    ratio = rng.random() * (hi - lo) + lo
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(image.shape[0], image.shape[1], target)
    return resize_image(image, size), resize_label(label, size)


# --------------------------------------------------------------------------------------------
# Crop and flip
# --------------------------------------------------------------------------------------------

def _crop_bbox(shape, crop_size, rng):
    """mmseg RandomCrop.get_crop_bbox: offsets ~ randint(0, max(H - ch, 0) + 1), h then w."""
    H, W = shape
    ch, cw = crop_size
    y1 = int(rng.integers(0, max(H - ch, 0) + 1))
    x1 = int(rng.integers(0, max(W - cw, 0) + 1))
    return y1, min(y1 + ch, H), x1, min(x1 + cw, W)


def _class_counts(seg, ignore_index):
    """Pixel counts of the non-ignored classes present in `seg`."""
    counts = np.bincount(seg.ravel())
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    return counts[counts > 0]


def random_crop(image, label, crop_size, rng, cat_max_ratio=0.75, ignore_index=255):
    """mmseg RandomCrop(crop_size, cat_max_ratio).

    Up to 10 times: accept the box if its label holds > 1 non-ignored class and the largest
    covers < cat_max_ratio of the non-ignored pixels, else draw a new box; after 10 rejections
    the 11th box is used unchecked. Sides smaller than the crop are kept whole (padded later).
    """
    box = _crop_bbox(label.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            counts = _class_counts(label[y1:y2, x1:x2], ignore_index)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_bbox(label.shape, crop_size, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(image, label, rng, prob=0.5):
    """mmseg RandomFlip(prob, direction='horizontal'): flip when rng.random() < prob."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# --------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion: mmcv.bgr2hsv / hsv2bgr on uint8)
# --------------------------------------------------------------------------------------------

def _convert(x, alpha=1.0, beta=0.0):
    """mmseg PhotoMetricDistortion.convert: float32 x * alpha + beta, clip, truncate to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg PhotoMetricDistortion on a uint8 RGB image, same draws in the same order.

    brightness (p 0.5, +U(-32, 32)) -> [contrast first if mode == 1] -> saturation (p 0.5,
    S * U(0.5, 1.5)) -> hue (p 0.5, H + randint(-18, 18) mod 180) -> [contrast last if
    mode == 0]; contrast (p 0.5) multiplies by U(0.5, 1.5). Every step clips and truncates to
    uint8 as mmseg does.
    """
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hue = hsv[..., 0].astype(np.int32) + int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = hue % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image


# --------------------------------------------------------------------------------------------
# Normalize, pad, and the two pipelines
# --------------------------------------------------------------------------------------------

_MEAN = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
_STDINV = (1.0 / torch.tensor(STD, dtype=torch.float64)).float().view(3, 1, 1)


def _normalize_into(out, image):
    """out[:, :h, :w] = (image - mean) / std as mmcv imnormalize: (x - mean) * (1 / std)."""
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, h, w) uint8
    region = out[:, :h, :w]
    region.copy_(x)
    region.sub_(_MEAN).mul_(_STDINV)
    return out


def normalize(image):
    """uint8 (H, W, 3) RGB -> float32 tensor (3, H, W) = (x - mean) / std."""
    h, w = image.shape[:2]
    return _normalize_into(torch.empty(3, h, w, dtype=torch.float32), image)


def normalize_pad(image, label, crop_size, ignore_index=255):
    """Normalize, then pad bottom/right to `crop_size`: image with 0, label with ignore_index.

    mmseg pads labels with 255, which is its ignore_index; padding with the dataset's
    ignore_index keeps other datasets (e.g. CamVid, ignore 11) valid.
    Returns image float32 (3, ch, cw), label int64 (ch, cw).
    """
    ch, cw = crop_size
    h, w = label.shape
    H, W = max(ch, h), max(cw, w)
    out_image = _normalize_into(torch.zeros(3, H, W, dtype=torch.float32), image)
    out_label = torch.full((H, W), ignore_index, dtype=torch.int64)
    out_label[:h, :w] = torch.from_numpy(np.ascontiguousarray(label))
    return out_image, out_label


def train_transform(image, label, rng, crop_size, scale=(2048, 512), ratio_range=(0.5, 2.0),
                    cat_max_ratio=0.75, flip_prob=0.5, ignore_index=255):
    """mmseg's train pipeline on one sample (every SETR config's, at its scale and crop).

    image: (H, W, 3) uint8 RGB; label: (H, W) non-negative ints; rng: numpy Generator.
    Returns image float32 (3, ch, cw) normalized and padded with 0, label int64 (ch, cw) padded
    with ignore_index.
    """
    image, label = random_rescale(image, label, rng, scale, ratio_range)
    image, label = random_crop(image, label, crop_size, rng, cat_max_ratio, ignore_index)
    image, label = random_flip(image, label, rng, flip_prob)
    image = photometric_distortion(image, rng)
    return normalize_pad(image, label, crop_size, ignore_index)


def eval_size(height, width, scale, short_min=0):
    """(h, w) of a (height, width) image in the test pipeline of `scale`.

    short_min = 0: mmseg's keep-ratio rescale into `scale` (rescale_size). short_min > 0: the SETR
    repository's Resize(dataset='pascal_context') (commit 0acc258, single and multi-scale): the
    short side becomes short_min if min(scale) < short_min, else min(scale) (its code takes
    scale[0]; its scales are square), the long side in proportion, then rescale_size into that.
    """
    if short_min:
        short = short_min if min(scale) < short_min else min(scale)
        scale = (short, short * max(height, width) / min(height, width))
    return rescale_size(height, width, scale)


def eval_transform(image, scale=(2048, 512), short_min=0):
    """The test pipeline: resize to eval_size(H, W, scale, short_min), normalize.

    image: (H, W, 3) uint8 RGB -> float32 tensor (3, h, w).
    """
    return normalize(resize_image(image, eval_size(image.shape[0], image.shape[1], scale, short_min)))
