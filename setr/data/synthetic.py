"""A procedural segmentation dataset: shapes on textured backgrounds, generated on the fly.

Nothing is downloaded and nothing is stored: sample i of (seed, split) is drawn from its own
RNG, so every worker, rank and run sees the same scene. Each class has a fixed look (a hue,
a texture with its own period and orientation, a shape) shared by all seeds and splits, so a
model trained on one split generalizes to another; each instance jitters its hue, saturation,
brightness, size, position and rotation, objects occlude each other, and pixel noise is added.
Colour alone does not separate the classes once mmseg's photometric distortion (hue +-36
degrees, saturation x0.5-1.5) has been applied: a model has to use texture and shape as well,
so it takes a few hundred SGD steps before the mIoU rises well above chance.
"""

import math

import numpy as np

SHAPES = ("disk", "square", "triangle", "stripes", "ring", "cross", "ellipse")
_SPLIT_IDS = {"training": 0, "train": 0, "validation": 1, "val": 1, "test": 2}


def synthetic_class_names(num_classes):
    """'background', then shape names; beyond the 7 shapes the names repeat with a suffix."""
    names = ["background"]
    for k in range(1, num_classes):
        shape = SHAPES[(k - 1) % len(SHAPES)]
        lap = (k - 1) // len(SHAPES)
        names.append(shape if lap == 0 else f"{shape}{lap + 1}")
    return tuple(names)


def _hsv_to_rgb(h, s, v):
    """Scalar HSV in [0, 1] -> RGB in [0, 255] (float)."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b]) * 255.0


def _class_look(k, num_classes):
    """Fixed appearance of class k >= 1: hue, texture kind, period (px), orientation."""
    hue = (k - 1) / max(num_classes - 1, 1)
    kind = k % 3  # 0 smooth blobs, 1 stripes, 2 checker
    period = 5.0 + 3.0 * ((k * 5) % 4)
    angle = (k * 0.9) % math.pi
    return hue, kind, period, angle


def synthetic_palette(num_classes):
    """Visualisation colours: background dark grey, class k its fixed hue at full saturation."""
    colours = [(40, 40, 40)]
    for k in range(1, num_classes):
        hue = _class_look(k, num_classes)[0]
        colours.append(tuple(int(round(c)) for c in _hsv_to_rgb(hue, 0.85, 0.95)))
    return tuple(colours)


class SyntheticSegmentation:
    """Procedural scenes: class 0 background plus shapes (disk, square, triangle, stripes, ring,
    cross, ellipse, then repeating with other colours).

    num_samples: dataset length; size: (H, W); seed, split: select the scenes (deterministic
    per (seed, split, index)); every pixel is labelled. Items as every dataset here:
    (image (H, W, 3) uint8 RGB, label (H, W) int64, name).
    """

    def __init__(self, num_samples, size=(128, 160), num_classes=8, seed=0, split="training",
                 ignore_index=255):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        h, w = (size, size) if isinstance(size, int) else size
        if h < 16 or w < 16:
            raise ValueError(f"synthetic image size must be at least 16x16, got {(h, w)}")
        if not 2 <= num_classes <= 255:
            raise ValueError(f"synthetic num_classes must be in [2, 255], got {num_classes}")
        if not num_classes <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be in [num_classes, 255], got {ignore_index}")
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_IDS)}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = int(num_samples)
        self.size = (int(h), int(w))
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self.split = split
        self.class_names = synthetic_class_names(self.num_classes)
        self.palette = synthetic_palette(self.num_classes)
        yy, xx = np.mgrid[0:h, 0:w]
        self._yy, self._xx = yy.astype(np.float32), xx.astype(np.float32)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        image, label, name = self.load(index)
        return image, label.astype(np.int64), name

    def __repr__(self):
        return (f"SyntheticSegmentation(num_samples={self.num_samples}, size={self.size}, "
                f"num_classes={self.num_classes}, seed={self.seed}, split={self.split!r})")

    # ---------------------------------------------------------------- generation
    def load(self, index):
        """(image uint8 (H, W, 3), label uint8 (H, W), name) of scene `index`."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = np.random.default_rng([0x5E7, self.seed, _SPLIT_IDS[self.split], index])
        H, W = self.size
        image = self._background(rng)
        label = np.zeros((H, W), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            k = int(rng.integers(1, self.num_classes))
            mask = self._shape_mask(k, rng)
            image[mask] = self._texture(k, rng)[mask]
            label[mask] = k
        image += rng.normal(0.0, 10.0, size=image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label, f"synthetic_{self.split}_{index:06d}"

    def _background(self, rng):
        """Low-saturation colour with a gentle gradient and a slow wave: (H, W, 3) float32."""
        H, W = self.size
        base = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8))
        theta = rng.uniform(0, 2 * math.pi)
        u = (self._xx * math.cos(theta) + self._yy * math.sin(theta)) / max(H, W)
        wx, wy = rng.uniform(40, 90), rng.uniform(40, 90)
        wave = np.sin(2 * math.pi * (self._xx / wx + self._yy / wy))
        shade = 1.0 + 0.25 * (u - 0.5) + 0.1 * wave
        return (base[None, None, :] * shade[..., None]).astype(np.float32)

    def _texture(self, k, rng):
        """Class k's look with this instance's jitter: (H, W, 3) float32."""
        hue, kind, period, angle = _class_look(k, self.num_classes)
        hue = (hue + rng.uniform(-0.04, 0.04)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95))
        angle += rng.uniform(-0.2, 0.2)
        phase = rng.uniform(0, 2 * math.pi)
        u = self._xx * math.cos(angle) + self._yy * math.sin(angle)
        v = -self._xx * math.sin(angle) + self._yy * math.cos(angle)
        if kind == 1:  # stripes
            pattern = np.sin(2 * math.pi * u / period + phase)
        elif kind == 2:  # checker
            pattern = np.sign(np.sin(2 * math.pi * u / period + phase) *
                              np.sin(2 * math.pi * v / period))
        else:  # smooth blobs
            pattern = (np.sin(2 * math.pi * u / (3 * period) + phase) *
                       np.cos(2 * math.pi * v / (3 * period)))
        amplitude = 0.25 if kind else 0.15
        return (colour[None, None, :] * (1.0 + amplitude * pattern)[..., None]).astype(np.float32)

    def _shape_mask(self, k, rng):
        """A random instance of class k's shape: (H, W) bool."""
        H, W = self.size
        shape = SHAPES[(k - 1) % len(SHAPES)]
        s = rng.uniform(0.12, 0.3) * min(H, W)
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        t = rng.uniform(0, 2 * math.pi)
        dy, dx = self._yy - cy, self._xx - cx
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        if shape == "disk":
            return u * u + v * v < s * s
        if shape == "square":
            return np.maximum(np.abs(u), np.abs(v)) < 0.85 * s
        if shape == "triangle":
            mask = np.ones((H, W), dtype=bool)
            for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3):
                mask &= u * math.cos(a) + v * math.sin(a) < 0.5 * s
            return mask
        if shape == "stripes":  # a long band
            return (np.abs(u) < 1.5 * s) & (np.abs(v) < 0.45 * s)
        if shape == "ring":
            r2 = u * u + v * v
            return (r2 < s * s) & (r2 > (0.55 * s) ** 2)
        if shape == "cross":
            arm = 0.33 * s
            return ((np.abs(u) < s) & (np.abs(v) < arm)) | ((np.abs(v) < s) & (np.abs(u) < arm))
        # ellipse
        return (u / s) ** 2 + (v / (0.5 * s)) ** 2 < 1.0
