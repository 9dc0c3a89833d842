"""Segmentation datasets on disk: any folder in the ADEChallengeData2016 layout, ADE20K, Cityscapes
and Pascal Context (the named datasets of setr.data.catalog).

    folder, ade20k    root/images/<split>/NAME.jpg|png|...      root/annotations/<split>/NAME.png
    cityscapes        root/leftImg8bit/<split>/<city>/NAME_leftImg8bit.png
                      root/gtFine/<split>/<city>/NAME_gtFine_labelTrainIds.png (or only _labelIds.png)
    pascal_context*   root/ImageSets/SegmentationContext/<split>.txt (one NAME a line)
                      root/JPEGImages/NAME.jpg                  root/SegmentationClassContext/NAME.png

Items are `(image, label, name)`: image (H, W, 3) uint8 RGB, label (H, W) int64 class ids in
[0, num_classes) or ignore_index, name the file stem. Every problem with a sample (unreadable or
truncated file, image/label size mismatch, label value that is neither a class nor
ignore_index) raises `DataError` naming the file; a split with a missing or empty folder, an
image without a label or a label without an image fails when the dataset is built.
"""

import os

import cv2
import numpy as np
from PIL import Image

from .catalog import IGNORE_INDEX, NAMED_DATASETS
from .cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_LABEL_IDS
from .synthetic import SyntheticSegmentation

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": "training", "training": "train", "val": "validation",
                 "validation": "val"}
# OpenCV's log level (get/setLogLevel): cv2.utils.logging from 5.0, the cv2 module itself in 4.x
CV2_LOGGING = getattr(cv2.utils, "logging", cv2)
CV2_LOG_SILENT = 0  # cv::utils::logging::LOG_LEVEL_SILENT


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent. `path` names it.

    DataError(path, problem); DataError(message) also works (path ''), which is how a
    DataLoader worker re-raises it in the main process: the message is then the original one,
    without the worker's traceback.
    """

    def __init__(self, path, problem=None):
        if problem is None:
            text = str(path).strip()
            if "Original Traceback" in text:  # "Caught DataError in DataLoader worker ... DataError: <message>"
                text = text.splitlines()[-1].split(": ", 1)[-1]
            path, problem = "", text
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class LabelValueError(DataError):
    """A label holds values that are neither a class id nor ignore_index (another dataset's labels?)."""


def read_image(path):
    """Decode an image file to (H, W, 3) uint8 RGB, exactly as mmseg loads one.

    mmseg's LoadImageFromFile calls mmcv.imfrombytes(file bytes, flag='color', backend='cv2'):
    cv2.imdecode(bytes, IMREAD_COLOR), a BGR uint8 image; its data preprocessor then flips it to
    RGB (bgr_to_rgb). What that means for each kind of file, mmcv's choices kept even where they
    are poor for segmentation:
      - grey (1-16 bit) and palette images are expanded to 3 channels;
      - alpha (grey+alpha, RGBA, palette transparency) is dropped, not composited: the colour
        stored under transparent pixels is what the model sees;
      - 16-bit images are reduced to 8 bits by OpenCV (the high byte): a 16-bit file that uses
        only the low range (12-bit sensors, depth maps) reads nearly black;
      - EXIF orientation is applied (JPEG, PNG, WebP, TIFF), but labels are read without it (as
        mmseg's LoadAnnotations does): a rotated photo then mismatches its label.
    A file OpenCV cannot decode (also a truncated one) raises DataError.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise DataError(path, f"cannot read image ({e.strerror or e})") from None
    if data.size == 0:
        raise DataError(path, "cannot decode image (empty file)")
    level = CV2_LOGGING.getLogLevel()
    CV2_LOGGING.setLogLevel(CV2_LOG_SILENT)  # a damaged file: our one-line error only
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise DataError(path, f"cannot decode image ({str(e).strip().splitlines()[-1]})") from None
    finally:
        CV2_LOGGING.setLogLevel(level)
    if bgr is None:
        raise DataError(path, "cannot decode image (not an image format OpenCV reads, or damaged)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label(path):
    """Decode a label image to an (H, W) integer array of raw class ids, as mmseg reads one.

    mmseg's LoadAnnotations: mmcv.imfrombytes(bytes, flag='unchanged', backend='pillow'), i.e.
    np.array(PIL.Image.open(...)) without EXIF orientation, then squeeze().astype(uint8).
    Single-channel modes: L and P (uint8; for P the palette indices are the ids), 1, I;16 and I.
    Two choices differ from mmseg, where it would be silently wrong: 16-bit values are kept
    (mmseg's astype(uint8) turns 256 into 0, a valid class; here a value beyond the classes is
    reported by FolderSegmentation.convert_label), and a label one pixel high or wide stays 2-D
    (squeeze would drop that axis). A colour label image (an RGB visualisation instead of the id
    map) raises DataError.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                raise DataError(path, f"label must be a single-channel image of class ids "
                                      f"(mode L, P or I;16), got mode {mode} (a colour "
                                      f"visualisation instead of the id map?)")
            label = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except Exception as e:
        raise DataError(path, f"cannot decode label ({type(e).__name__}: {e})") from None
    if label.dtype == bool:
        label = label.astype(np.uint8)
    if label.ndim != 2 or label.dtype.kind not in "ui":
        raise DataError(path, f"label must be an (H, W) integer image, got shape "
                              f"{label.shape} dtype {label.dtype}")
    return label


def random_palette(num_classes, seed=42):
    """mmseg's palette for datasets without one: randint(0, 255, (n, 3)) from seed 42."""
    rows = np.random.RandomState(seed).randint(0, 255, size=(num_classes, 3))
    return tuple(tuple(int(v) for v in row) for row in rows)


def read_class_names(path):
    """One class name per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise DataError(path, f"cannot read class names ({e})") from None


def _split_dir(parent, split):
    """(parent/<split>, the split's folder name), accepting the train/val <-> training/validation
    aliases."""
    for name in (split, SPLIT_ALIASES.get(split)):
        if name and os.path.isdir(os.path.join(parent, name)):
            return os.path.join(parent, name), name
    found = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    hint = f" (splits found: {', '.join(found)})" if found else (
        f" ({parent} does not exist)" if not os.path.isdir(parent) else " (no splits found)")
    raise DataError(os.path.join(parent, split), f"split folder {split!r} does not exist{hint}")


def _resolve_split_dir(root, split):
    """root/images/<split> and root/annotations/<split>, accepting train/val aliases."""
    image_dir, name = _split_dir(os.path.join(root, "images"), split)
    return image_dir, os.path.join(root, "annotations", name)


class FolderSegmentation:
    """Images + label PNGs in the ADEChallengeData2016 layout.

    root/images/<split>/NAME.<jpg|png|...>, root/annotations/<split>/NAME.png; `split` may be
    written 'train'/'val' or 'training'/'validation'.
    num_classes: ids are 0..num_classes-1 (after reduce_zero_label).
    ignore_index: label value excluded from loss and metrics (>= num_classes).
    reduce_zero_label: raw 0 -> ignore_index, raw k -> k - 1 (ADE20K). A raw value equal to
        ignore_index stays ignore_index (as in mmseg).
    class_names: a sequence, a path to a text file (one name per line), or None for
        root/classes.txt when it exists, else 'class0', 'class1', ...
    palette: num_classes RGB triples, or None for mmseg's seeded random palette.
    """

    def __init__(self, root, split, num_classes, ignore_index=255, reduce_zero_label=False,
                 class_names=None, palette=None, image_suffixes=IMAGE_SUFFIXES,
                 label_suffix=".png"):
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(ignore_index, (int, np.integer)) or ignore_index < 0:
            raise ValueError(f"ignore_index must be a non-negative int (labels are stored as "
                             f"non-negative ids), got {ignore_index!r}")
        if ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a valid class id for "
                             f"num_classes={num_classes}; it must be >= num_classes")
        self.root = str(root)
        self.split = split
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.image_paths, self.label_paths, self.names = self._list_files(image_suffixes, label_suffix)
        self.class_names = self._class_names(class_names)
        if palette is None:
            palette = random_palette(self.num_classes)
        if len(palette) != self.num_classes:
            raise ValueError(f"palette has {len(palette)} colours, expected num_classes="
                             f"{self.num_classes}")
        self.palette = tuple(tuple(int(v) for v in c) for c in palette)
        self._luts = {}

    # ---------------------------------------------------------------- listing
    def _list_files(self, image_suffixes, label_suffix):
        """(image paths, label paths, names) of the split; every image has its label."""
        self.image_dir, self.label_dir = _resolve_split_dir(self.root, self.split)
        image_paths, label_paths = self._pair_files(image_suffixes, label_suffix)
        return image_paths, label_paths, [os.path.splitext(os.path.basename(p))[0] for p in image_paths]

    def _pair_files(self, image_suffixes, label_suffix):
        suffixes = tuple(s.lower() for s in image_suffixes)
        images = {}
        for f in sorted(os.listdir(self.image_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in suffixes or f.startswith("."):
                continue
            if stem in images:
                raise DataError(os.path.join(self.image_dir, f),
                                f"two images named {stem!r} ({os.path.basename(images[stem])} "
                                f"and {f}); names must be unique")
            images[stem] = os.path.join(self.image_dir, f)
        if not images:
            raise DataError(self.image_dir, f"no images ({', '.join(suffixes)}) in the split "
                                            f"folder")
        if not os.path.isdir(self.label_dir):
            raise DataError(self.label_dir, "annotation folder for this split does not exist")
        labels = {}
        for f in sorted(os.listdir(self.label_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() == label_suffix and not f.startswith("."):
                labels[stem] = os.path.join(self.label_dir, f)
        for stem, path in images.items():
            if stem not in labels:
                raise DataError(path, f"image has no label "
                                      f"{os.path.join(self.label_dir, stem + label_suffix)}")
        for stem, path in labels.items():
            if stem not in images:
                raise DataError(path, f"label has no image {stem}.* in {self.image_dir}")
        stems = sorted(images)
        return [images[s] for s in stems], [labels[s] for s in stems]

    def _class_names(self, class_names):
        if class_names is None:
            default = os.path.join(self.root, "classes.txt")
            if os.path.isfile(default):
                class_names = default
        if isinstance(class_names, (str, os.PathLike)):
            path = class_names
            class_names = read_class_names(path)
            if len(class_names) != self.num_classes:
                raise DataError(path, f"{len(class_names)} class names, expected num_classes="
                                      f"{self.num_classes}")
        if class_names is None:
            return tuple(f"class{i}" for i in range(self.num_classes))
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given, expected num_classes="
                             f"{self.num_classes}")
        return tuple(str(n) for n in class_names)

    # ---------------------------------------------------------------- labels
    @property
    def label_dtype(self):
        """Compact dtype holding every class id and ignore_index."""
        return np.uint8 if self.ignore_index <= 255 else np.int32

    def _lut(self, size):
        """raw id -> (label, valid) lookup tables over raw values 0..size-1."""
        if size not in self._luts:
            raw = np.arange(size, dtype=np.int64)
            mapped = raw - 1 if self.reduce_zero_label else raw.copy()
            if self.reduce_zero_label:
                mapped[0] = self.ignore_index
            if self.ignore_index < size:
                mapped[self.ignore_index] = self.ignore_index
            valid = (mapped < self.num_classes) | (mapped == self.ignore_index)
            mapped[~valid] = self.ignore_index
            self._luts[size] = (mapped.astype(self.label_dtype), valid)
        return self._luts[size]

    def convert_label(self, raw, path="<label>"):
        """Raw ids -> class ids (reduce_zero_label), checking every value. Compact dtype."""
        if raw.dtype == np.uint8:
            size = 256
        else:
            lo, hi = int(raw.min()), int(raw.max())
            if lo < 0:
                raise DataError(path, f"negative label value {lo}")
            size = 65536 if hi < 65536 else hi + 1
            if size > 1 << 24:
                raise DataError(path, f"label value {hi} is far outside [0, {self.num_classes})")
        mapped, valid = self._lut(size)
        counts = np.bincount(raw.ravel(), minlength=size)
        bad = np.nonzero((counts > 0) & ~valid)[0]
        if len(bad):
            shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
            rule = (" after reduce_zero_label (raw 0 -> ignore, raw k -> k-1)"
                    if self.reduce_zero_label else "")
            raise LabelValueError(path, f"label values [{shown}] ({int(counts[bad].sum())} pixels) "
                                  f"are outside [0, {self.num_classes}){rule} and not "
                                  f"ignore_index {self.ignore_index}")
        return mapped[raw]

    # ---------------------------------------------------------------- items
    def __len__(self):
        return len(self.image_paths)

    def load(self, index):
        """(image (H, W, 3) uint8, label (H, W) compact dtype, name); raises DataError."""
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = read_image(image_path)
        raw = read_label(label_path)
        if image.shape[:2] != raw.shape:
            raise DataError(label_path, f"label size {raw.shape[1]}x{raw.shape[0]} (WxH) does "
                                        f"not match image {image_path} size "
                                        f"{image.shape[1]}x{image.shape[0]}")
        return image, self.convert_label(raw, label_path), self.names[index]

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, label, name = self.load(index % len(self))
        return image, label.astype(np.int64), name

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
                f"samples={len(self)}, num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}, reduce_zero_label={self.reduce_zero_label})")


def _catalog_settings(name):
    """FolderSegmentation's class settings of a named dataset (setr.data.catalog)."""
    info = NAMED_DATASETS[name]
    return dict(num_classes=info.num_classes, ignore_index=IGNORE_INDEX, reduce_zero_label=info.reduce_zero_label,
                class_names=info.classes, palette=info.palette)


class ADE20K(FolderSegmentation):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, .jpg images, reduce_zero_label.

    root: the ADEChallengeData2016 folder (or its parent). split: 'training'/'validation'
    (or 'train'/'val').
    """

    def __init__(self, root, split):
        root = str(root)
        nested = os.path.join(root, "ADEChallengeData2016")
        if not os.path.isdir(os.path.join(root, "images")) and os.path.isdir(nested):
            root = nested
        super().__init__(root, split, image_suffixes=(".jpg",), **_catalog_settings("ade20k"))


# cityscapesscripts' labelId -> trainId as a lookup table over the labelIds 0..33
_TRAIN_ID_OF_LABEL_ID = np.array([LABEL_ID_TO_TRAIN_ID.get(i, IGNORE_INDEX) for i in range(NUM_LABEL_IDS)],
                                 dtype=np.uint8)


class Cityscapes(FolderSegmentation):
    """Cityscapes gtFine as mmseg's CityscapesDataset: 19 classes (trainIds), 255 ignored.

    root: the folder holding leftImg8bit/ and gtFine/; split: 'train' / 'val' (or 'training' /
    'validation'). Images are found in the split's city folders; labels are the
    *_gtFine_labelTrainIds.png files that cityscapesscripts' csCreateTrainIdLabelImgs writes. A split
    with none of those but every *_gtFine_labelIds.png reads the labelIds and maps them with
    cityscapesscripts' labelId -> trainId table (`from_label_ids`): the same numbers, since both
    files are drawn from the same polygons, without the conversion step or its dependency.
    Item names: the file names without _leftImg8bit.png.
    """
    IMAGE_SUFFIX, TRAIN_IDS, LABEL_IDS = "_leftImg8bit.png", "_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"

    def __init__(self, root, split):
        super().__init__(root, split, **_catalog_settings("cityscapes"))

    @property
    def from_label_ids(self):
        """True when the split is read from its *_gtFine_labelIds.png (it has no trainIds files)."""
        return self.label_paths[0].endswith(self.LABEL_IDS)

    def _list_files(self, image_suffixes, label_suffix):
        image_dir, split = _split_dir(os.path.join(self.root, "leftImg8bit"), self.split)
        label_dir = os.path.join(self.root, "gtFine", split)
        stems = sorted(os.path.relpath(os.path.join(folder, f), image_dir)[:-len(self.IMAGE_SUFFIX)]
                       for folder, _, files in os.walk(image_dir) for f in files if f.endswith(self.IMAGE_SUFFIX))
        if not stems:
            raise DataError(image_dir, f"no *{self.IMAGE_SUFFIX} images in the split folder or its city folders")
        images = [os.path.join(image_dir, s + self.IMAGE_SUFFIX) for s in stems]
        train_ids = [os.path.join(label_dir, s + self.TRAIN_IDS) for s in stems]
        label_ids = [os.path.join(label_dir, s + self.LABEL_IDS) for s in stems]
        have = [os.path.isfile(p) for p in train_ids]
        names = [os.path.basename(s) for s in stems]
        if all(have):
            return images, train_ids, names
        if not any(have) and all(map(os.path.isfile, label_ids)):
            return images, label_ids, names
        make = (f"make them with cityscapesscripts (pip install cityscapesscripts; CITYSCAPES_DATASET={self.root} "
                f"csCreateTrainIdLabelImgs) or mmseg's tools/dataset_converters/cityscapes.py {self.root}")
        if any(have):
            raise DataError(train_ids[have.index(False)],
                            f"trainIds label not found, while {sum(have)} of the {len(have)} images of the split "
                            f"have theirs: {make}; or delete them all to have the *{self.LABEL_IDS} read instead")
        missing = next(i for i, p in enumerate(label_ids) if not os.path.isfile(p))
        raise DataError(train_ids[missing], f"label not found (nor {os.path.basename(label_ids[missing])}): every "
                                            f"image needs its *{self.TRAIN_IDS} ({make}) or its *{self.LABEL_IDS}")

    def convert_label(self, raw, path="<label>"):
        """labelIds -> trainIds first when the split has only labelIds; then the usual checks."""
        if self.from_label_ids:
            bad = np.unique(raw[raw >= NUM_LABEL_IDS])
            if len(bad):
                shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
                raise DataError(path, f"label values [{shown}] are not Cityscapes labelIds (0..{NUM_LABEL_IDS - 1})")
            raw = _TRAIN_ID_OF_LABEL_ID[raw]
        return super().convert_label(raw, path)


class PascalContext(FolderSegmentation):
    """Pascal Context in mmseg's converted layout, as mmseg's PascalContextDataset: 60 classes
    (background is class 0), what the SETR paper trains. PascalContext59 is the 59-class variant.

    root: VOCdevkit/VOC2010 (or a folder holding VOCdevkit/VOC2010 or VOC2010); split: 'train' /
    'val' (or 'training' / 'validation'), the names listed in ImageSets/SegmentationContext/<split>.txt,
    in the file's order; images JPEGImages/NAME.jpg, labels SegmentationClassContext/NAME.png.
    """
    NAME = "pascal_context"
    SPLITS = os.path.join("ImageSets", "SegmentationContext")

    def __init__(self, root, split):
        root = str(root)
        for nested in (os.path.join(root, "VOCdevkit", "VOC2010"), os.path.join(root, "VOC2010")):
            if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(nested):
                root = nested
        super().__init__(root, split, **_catalog_settings(self.NAME))

    def _list_files(self, image_suffixes, label_suffix):
        folder = os.path.join(self.root, self.SPLITS)
        files = [os.path.join(folder, f"{name}.txt") for name in (self.split, SPLIT_ALIASES.get(self.split)) if name]
        split_file = next((f for f in files if os.path.isfile(f)), None)
        if split_file is None:
            found = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt")) if os.path.isdir(folder) else []
            hint = f"splits found: {', '.join(found)}" if found else f"{folder} has no split files"
            raise DataError(files[0], f"split file for {self.split!r} does not exist ({hint})")
        try:
            with open(split_file, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(split_file, f"cannot read the split file ({e})") from None
        if not names:
            raise DataError(split_file, "the split lists no images")
        images = [os.path.join(self.root, "JPEGImages", n + ".jpg") for n in names]
        labels = [os.path.join(self.root, "SegmentationClassContext", n + ".png") for n in names]
        for image, label in zip(images, labels):
            if not os.path.isfile(image):
                raise DataError(image, f"image listed in {split_file} not found")
            if not os.path.isfile(label):
                raise DataError(label, "label not found (SegmentationClassContext/ is made by mmseg's "
                                       "tools/dataset_converters/pascal_context.py from trainval_merged.json)")
        return images, labels, names


class PascalContext59(PascalContext):
    """Pascal Context as mmseg's PascalContextDataset59: 59 classes, background (label 0) ignored,
    label k -> class k - 1. Same files as PascalContext."""
    NAME = "pascal_context59"


NAMED_READERS = {"ade20k": ADE20K, "cityscapes": Cityscapes, "pascal_context": PascalContext,
                 "pascal_context59": PascalContext59}
DATASETS = (*NAMED_READERS, "folder", "synthetic")  # the names build_dataset knows


def build_dataset(name, root=None, split="training", num_classes=None, ignore_index=255,
                  reduce_zero_label=None, synthetic_size=(128, 160), synthetic_samples=None,
                  seed=0, class_names=None):
    """A raw dataset by name, one of DATASETS: a named dataset (setr.data.catalog: 'ade20k',
    'cityscapes', 'pascal_context', 'pascal_context59'), 'folder' or 'synthetic'.

    Named datasets: root as the catalog says; num_classes / reduce_zero_label / ignore_index, if
        given, must be the dataset's. folder: num_classes required. synthetic: root ignored;
        num_classes default 8; synthetic_samples default 512 for training, 64 for other splits; the
        split name is part of the seed, so training and validation scenes differ.
    """
    if name in NAMED_READERS:
        info = NAMED_DATASETS[name]
        if root is None:
            raise ValueError(f"dataset {name!r} needs root ({info.root})")
        if num_classes not in (None, info.num_classes):
            raise ValueError(f"{info.title} has {info.num_classes} classes, got num_classes={num_classes}")
        if reduce_zero_label is not None and bool(reduce_zero_label) != info.reduce_zero_label:
            raise ValueError(f"{info.title} labels " + ("always use reduce_zero_label (0 = unlabelled)"
                                                        if info.reduce_zero_label else "never use reduce_zero_label"))
        if ignore_index != IGNORE_INDEX:
            raise ValueError(f"{info.title} uses ignore_index {IGNORE_INDEX}, got {ignore_index}")
        return NAMED_READERS[name](root, split)
    if name == "folder":
        if root is None or num_classes is None:
            raise ValueError("dataset 'folder' needs root and num_classes")
        return FolderSegmentation(root, split, num_classes, ignore_index=ignore_index,
                                  reduce_zero_label=bool(reduce_zero_label),
                                  class_names=class_names)
    if name == "synthetic":
        if synthetic_samples is None:
            synthetic_samples = 512 if split in ("train", "training") else 64
        return SyntheticSegmentation(synthetic_samples, size=synthetic_size,
                                     num_classes=8 if num_classes is None else num_classes,
                                     seed=seed, split=split, ignore_index=ignore_index)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
