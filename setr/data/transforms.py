"""Image and label transforms: mmsegmentation's ADE20K train and test pipelines in numpy/torch.

Images are uint8 (H, W, 3) RGB numpy arrays, labels (H, W) non-negative integer arrays, until
`normalize_pad` turns them into the tensors the model eats. Randomness comes from an explicit
`numpy.random.Generator`, drawn in the same order and from the same distributions as mmseg's
transforms draw from numpy's global RNG:

    train: rescale (ratio 0.5-2.0 of (2048, 512), keep ratio) -> random crop (cat_max_ratio 0.75)
           -> horizontal flip 0.5 -> photometric distortion -> normalize -> pad to the crop
    test:  rescale to (2048, 512) keep ratio -> normalize

Resizing. mmseg resizes with cv2 (INTER_LINEAR for images, INTER_NEAREST for labels); there is
no cv2 here. Images use torch `F.interpolate(bilinear, align_corners=False, antialias=False)`,
which is the same half-pixel bilinear with clamped borders as cv2 (no antialiasing when
shrinking, unlike PIL). cv2 computes in 11-bit fixed point, so results differ by at most one
grey level on some pixels: the float path (`fast=False`, used at test time) rounds to the
nearest level and differs from cv2 by 1 on ~5-10% of pixels; torch's uint8 kernel (`fast=True`,
used for training, ~10x faster) on ~15-25%. Labels use cv2's nearest rule exactly:
source index floor(dst * in / out).
"""

import numpy as np
import torch
import torch.nn.functional as F

from setr.layers import PATCH_SIZE

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


def resize_image(image, size, fast=False):
    """Bilinear resize (cv2 INTER_LINEAR semantics, see the module docstring).

    image: (H, W, 3) uint8; size: (h, w). Returns (h, w, 3) uint8.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    # (1, 3, H, W) view of the HWC array: channels-last, so the output is channels-last too
    # and y[0].permute(1, 2, 0) is a contiguous HWC array without a copy.
    x = torch.from_numpy(np.ascontiguousarray(image))[None].permute(0, 3, 1, 2)
    if fast:
        # torch's uint8 kernel (fixed point, channels-last) is the fast CPU path.
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    else:
        y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False,
                          antialias=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def resize_label(label, size):
    """Nearest resize exactly as cv2 INTER_NEAREST: source index = floor(dst * in / out).

    label: (H, W) integer array; size: (h, w). Returns (h, w), same dtype.
    """
    H, W = label.shape
    h, w = size
    if (H, W) == (h, w):
        return label
    ys = np.minimum(np.floor(np.arange(h) * (H / h)).astype(np.intp), H - 1)
    xs = np.minimum(np.floor(np.arange(w) * (W / w)).astype(np.intp), W - 1)
    return np.take(np.take(label, ys, axis=0), xs, axis=1)


def random_rescale(image, label, rng, scale=(2048, 512), ratio_range=(0.5, 2.0), fast=True):
    """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

    ratio ~ U(ratio_range); target scale = (int(scale[0] * ratio), int(scale[1] * ratio));
    then keep-ratio rescale into it (image bilinear, label nearest).
    """
    lo, hi = ratio_range
    ratio = rng.random() * (hi - lo) + lo
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(image.shape[0], image.shape[1], target)
    return resize_image(image, size, fast=fast), resize_label(label, size)


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
# Photometric distortion (mmseg PhotoMetricDistortion, OpenCV uint8 HSV semantics)
# --------------------------------------------------------------------------------------------

def _hsv_tables():
    """Lookup tables reproducing OpenCV's uint8 HSV conversions bit for bit.

    RGB2HSV_b (integer, 12-bit fixed point): s = (diff * round((255 << 12) / v) + 2048) >> 12,
    h = (num * round((180 << 12) / (6 diff)) + 2048) >> 12 (+180 if < 0) with num = g - b,
    b - r + 2 diff or r - g + 4 diff when the max is r, g or b. Tabulated over (v, diff) and
    (num, diff). HSV2RGB_b (float32): each channel is v (1 - s c) with c in {0, 1, f, 1 - f}
    picked by the hue sector, f the fractional hue; 1 - s c is tabulated over (h, s).
    """
    shift, half = 12, 1 << 11
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.rint((255 << shift) / i), 0).astype(np.int64)
        hdiv = np.where(i > 0, np.rint((180 << shift) / (6 * i)), 0).astype(np.int64)
    diff = np.arange(256)
    s_table = ((diff[None, :] * sdiv[:, None] + half) >> shift).clip(0, 255)  # [v, diff]
    num = np.arange(-255, 5 * 255 + 1)
    h = (num[:, None] * hdiv[None, :] + half) >> shift  # [num + 255, diff]
    h = np.where(h < 0, h + 180, h)
    # Hue coefficient per (uint8 hue, output channel r/g/b), float32 as OpenCV computes it.
    hue = np.arange(256, dtype=np.float32) * np.float32(6.0 / 180.0)
    hue = np.fmod(hue, np.float32(6.0))
    sector = np.floor(hue).astype(np.int64)
    frac = (hue - sector.astype(np.float32)).astype(np.float32)
    one = np.float32(1.0)
    coef = np.stack([np.zeros_like(frac), np.ones_like(frac), frac, one - frac], -1)  # tab 0..3
    # (r, g, b) <- tab index per sector; OpenCV's sector_data gives (b, g, r).
    sector_rgb = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    c_table = np.take_along_axis(coef, sector_rgb[sector], axis=-1).astype(np.float64)
    s = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    # 1 - s c rounded once to float32 (a fused multiply-add), indexed by h * 256 + s.
    t_table = (1.0 - s.astype(np.float64)[None, :, None] * c_table[:, None, :]).astype(np.float32)
    return s_table.astype(np.uint8).ravel(), h.astype(np.uint8).ravel(), t_table.reshape(-1, 3)


_S_TABLE, _H_TABLE, _T_TABLE = _hsv_tables()


def rgb2hsv(image):
    """uint8 RGB -> uint8 HSV exactly as cv2.cvtColor(COLOR_RGB2HSV): H in [0, 180), S, V 0-255.

    (mmcv.bgr2hsv on a BGR image gives the same numbers.) image: (..., 3) uint8.
    """
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)  # uint8, no overflow
    r, g, b = r.astype(np.int16), g.astype(np.int16), b.astype(np.int16)
    d = diff.astype(np.int16)
    num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * d, r - g + 4 * d))
    h = np.take(_H_TABLE, (num.astype(np.intp) + 255) * 256 + diff)
    s = np.take(_S_TABLE, v.astype(np.intp) * 256 + diff)
    return np.stack([h, s, v], axis=-1)


def hsv2rgb(hsv):
    """uint8 HSV (H in [0, 180)) -> uint8 RGB as cv2.cvtColor(COLOR_HSV2RGB) does on x86.

    Per channel v (1 - s c) * 255 in float32, truncated to uint8: OpenCV >= 4.1.1's vectorized
    HSV2RGB_b truncates (v_trunc), and its AVX2 build fuses 1 - s c into one FMA (tabulated
    over (h, s) with a single rounding). Bit-exact with opencv-python 5.0 on every (h, s, v),
    except that OpenCV converts the last (width mod 32 or 64) pixels of each row in scalar
    code that rounds instead (those can differ by one level; machine dependent, not copied).
    hsv: (..., 3) uint8.
    """
    v = hsv[..., 2:3].astype(np.float32) * np.float32(1.0 / 255.0)
    rgb = np.take(_T_TABLE, hsv[..., 0].astype(np.intp) * 256 + hsv[..., 1], axis=0)  # 1 - s c
    rgb *= v
    rgb *= np.float32(255.0)
    return rgb.clip(0, 255).astype(np.uint8)


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
        hsv = rgb2hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv2rgb(hsv)
    if rng.integers(2):
        hsv = rgb2hsv(image)
        hue = hsv[..., 0].astype(np.int32) + int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = hue % 180
        image = hsv2rgb(hsv)
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
    """mmseg's ADE20K train pipeline on one sample.

    image: (H, W, 3) uint8 RGB; label: (H, W) non-negative ints; rng: numpy Generator.
    Returns image float32 (3, ch, cw) normalized and padded with 0, label int64 (ch, cw) padded
    with ignore_index.
    """
    image, label = random_rescale(image, label, rng, scale, ratio_range, fast=True)
    image, label = random_crop(image, label, crop_size, rng, cat_max_ratio, ignore_index)
    image, label = random_flip(image, label, rng, flip_prob)
    image = photometric_distortion(image, rng)
    return normalize_pad(image, label, crop_size, ignore_index)


def eval_transform(image, scale=(2048, 512)):
    """mmseg's test pipeline: keep-ratio rescale into `scale`, normalize.

    image: (H, W, 3) uint8 RGB -> float32 tensor (3, h, w).
    """
    size = rescale_size(image.shape[0], image.shape[1], scale)
    return normalize(resize_image(image, size, fast=False))
