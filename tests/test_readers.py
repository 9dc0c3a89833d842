"""setr.data.read_image / read_label: every kind of file a user may have, read as mmcv and mmseg
read it (fabricated files: grey, grey+alpha, RGB, RGBA, palette; 1- to 16-bit; EXIF orientation)."""
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from setr.data import DataError, FolderSegmentation, read_image, read_label


def mmcv_imread_rgb(path):
    """mmcv 2.x `imread(path)` from its description (flag 'color', backend 'cv2'): the file's bytes
    (fileio.get), cv2.imdecode(np.frombuffer(bytes, uint8), cv2.IMREAD_COLOR) -> BGR uint8; then
    mmseg's data preprocessor, bgr_to_rgb."""
    with open(path, "rb") as f:
        content = f.read()
    bgr = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1]


def mmseg_load_annotations(path):
    """mmseg 1.x LoadAnnotations from its description: mmcv.imfrombytes(bytes, flag='unchanged',
    backend='pillow') = np.array(PIL.Image.open(bytes)) (colour channels to BGR), then
    .squeeze().astype(np.uint8)."""
    with open(path, "rb") as f:
        array = np.array(Image.open(io.BytesIO(f.read())))
    if array.ndim >= 3 and array.shape[2] >= 3:
        array[:, :, :3] = array[:, :, (2, 1, 0)]
    return array.squeeze().astype(np.uint8)


def write_png(path, samples, color_type, bit_depth, palette=None, transparent=None):
    """A PNG written byte by byte (no image library), so that every colour type x bit depth exists.

    samples: (H, W, C) integers, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; palette images (color
    type 3) give indices (C = 1), palette (N, 3) uint8 and the tRNS alpha of each entry."""
    h, w, _ = samples.shape
    rows = []
    for row in samples.reshape(h, -1).astype(np.uint64):
        if bit_depth == 16:
            data = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:  # 1, 2, 4 bits per sample, most significant first, rows padded to a byte
            bits = (row[:, None] >> np.arange(bit_depth - 1, -1, -1, dtype=np.uint64)) & 1
            data = np.packbits(bits.astype(np.uint8).ravel()).tobytes()
        rows.append(b"\x00" + data)  # filter type 0 (none)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        png += chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if transparent is not None:
        png += chunk(b"tRNS", np.asarray(transparent, np.uint8).tobytes())
    png += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return path


def _to8(samples, bit_depth):
    """What an 8-bit decoder shows for samples of bit_depth: low depths scaled up, 16 bits the high byte."""
    if bit_depth == 16:
        return (samples >> 8).astype(np.uint8)
    return (samples * (255 // (2 ** bit_depth - 1))).astype(np.uint8)


# (name, PNG color type, bit depth, channels): every combination PNG allows, bar those equal in kind
PNG_MODES = [("grey1", 0, 1, 1), ("grey2", 0, 2, 1), ("grey4", 0, 4, 1), ("grey8", 0, 8, 1), ("grey16", 0, 16, 1),
             ("grey_alpha8", 4, 8, 2), ("grey_alpha16", 4, 16, 2), ("rgb8", 2, 8, 3), ("rgb16", 2, 16, 3),
             ("rgba8", 6, 8, 4), ("rgba16", 6, 16, 4)]


@pytest.mark.parametrize("name,color_type,bit_depth,channels", PNG_MODES, ids=[m[0] for m in PNG_MODES])
def test_png_of_every_mode_reads_as_mmcv_reads_it(tmp_path, name, color_type, bit_depth, channels):
    rng = np.random.default_rng(bit_depth * 10 + channels)
    samples = rng.integers(0, 2 ** bit_depth, (5, 11, channels), dtype=np.uint64)  # odd width: padded rows
    path = write_png(tmp_path / f"{name}.png", samples, color_type, bit_depth)
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (5, 11, 3) and got.flags.c_contiguous
    assert np.array_equal(got, mmcv_imread_rgb(path))
    # what that means, spelled out: grey repeated, alpha dropped (not composited), 16 bits -> high byte
    colour = samples[:, :, :3] if channels >= 3 else np.repeat(samples[:, :, :1], 3, axis=2)
    assert np.array_equal(got, _to8(colour, bit_depth))


@pytest.mark.parametrize("bit_depth", [1, 2, 4, 8])
def test_palette_png_reads_its_colours_and_ignores_transparency(tmp_path, bit_depth):
    rng = np.random.default_rng(bit_depth)
    entries = 2 ** bit_depth
    palette = rng.integers(0, 256, (entries, 3), dtype=np.uint8)
    index = rng.integers(0, entries, (6, 9, 1), dtype=np.uint64)
    alpha = rng.integers(0, 256, entries, dtype=np.uint8)
    for transparent in (None, alpha):
        path = write_png(tmp_path / f"p{bit_depth}.png", index, 3, bit_depth, palette, transparent)
        got = read_image(path)
        assert np.array_equal(got, mmcv_imread_rgb(path))
        assert np.array_equal(got, palette[index[:, :, 0]])


# EXIF orientation tag value -> what it asks of the stored pixels (a: (H, W, 3))
ORIENTATIONS = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
                5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
                8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_to_images_not_to_labels(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif.tobytes())
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    got = read_image(tmp_path / "photo.png")
    assert np.array_equal(got, mmcv_imread_rgb(tmp_path / "photo.png"))
    assert np.array_equal(got, ORIENTATIONS[orientation](stored))
    jpeg = read_image(tmp_path / "photo.jpg")  # lossy: equal to mmcv's decoding, rotated the same way
    assert np.array_equal(jpeg, mmcv_imread_rgb(tmp_path / "photo.jpg")) and jpeg.shape == got.shape
    ids = stored[:, :, 0] % 8
    Image.fromarray(ids).save(tmp_path / "label.png", exif=exif.tobytes())
    label = read_label(tmp_path / "label.png")  # mmseg reads labels 'unchanged': never rotated
    assert np.array_equal(label, ids) and np.array_equal(label, mmseg_load_annotations(tmp_path / "label.png"))


OTHER_FORMATS = [("jpg", "L"), ("jpg", "RGB"), ("jpg", "CMYK"), ("tif", "RGBA"), ("tif", "I;16"), ("tif", "P"),
                 ("webp", "RGBA"), ("bmp", "P"), ("bmp", "1")]
LOSSY = ("jpg", "webp")  # as Pillow writes them by default


def two_halves(mode, height=16, width=32):
    """(Pillow image of `mode`, the (H, W, 3) uint8 RGB it shows): the left half red (dark grey, black
    for 1 bit), the right half blue (light grey, white). Halves of whole 16x16 JPEG blocks, so that
    lossy codecs keep their colours away from the edge."""
    left = np.arange(width) < width // 2
    rgb = np.where(left[:, None], [255, 0, 0], [0, 0, 255]).astype(np.uint8)
    grey = np.where(left, 30, 200).astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        pixels = np.concatenate([rgb, np.full((width, 1), 255, np.uint8)], 1) if mode == "RGBA" else rgb
        image = Image.fromarray(np.broadcast_to(pixels, (height, width, len(mode))).copy())
    elif mode == "CMYK":
        cmyk = np.where(left[:, None], [0, 255, 255, 0], [255, 255, 0, 0]).astype(np.uint8)
        image = Image.frombytes("CMYK", (width, height), np.broadcast_to(cmyk, (height, width, 4)).tobytes())
    elif mode == "1":
        image, grey = Image.fromarray(np.broadcast_to(~left, (height, width)).copy()), np.where(left, 0, 255)
    elif mode == "I;16":  # the low byte differs from the high one: a decoder that clips or scales shows it
        image = Image.fromarray(np.broadcast_to(grey.astype(np.uint16) * 256 + 255 - grey, (height, width)).copy())
    else:
        image = Image.fromarray(np.broadcast_to(grey, (height, width)).copy()).convert(mode)  # L, or P with grey entries
    shown = rgb if mode in ("RGB", "RGBA", "CMYK") else np.repeat(grey[:, None], 3, axis=1).astype(np.uint8)
    assert image.mode == mode
    return image, np.broadcast_to(shown, (height, width, 3))


@pytest.mark.parametrize("fmt,mode", OTHER_FORMATS)
def test_other_formats_read_as_mmcv_reads_them(tmp_path, fmt, mode):
    """Decoders other than PNG's: whatever OpenCV makes of them (e.g. a CMYK JPEG's conversion, an
    RGBA TIFF's premultiplied colours) is what mmseg trains on, so it is what we read. Checked
    independently of OpenCV too: known colours in RGB order (exact for lossless formats), and
    Pillow's decoding of the same random file within 2 for lossy ones."""
    rng = np.random.default_rng(len(mode))
    channels = {"L": 1, "P": 1, "1": 1, "I;16": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    high = 2 if mode == "1" else 65536 if mode == "I;16" else 256
    pixels = rng.integers(0, high, (6, 9, channels)).squeeze(-1) if channels == 1 else \
        rng.integers(0, high, (6, 9, channels))
    dtype = np.uint16 if mode == "I;16" else bool if mode == "1" else np.uint8
    if mode == "CMYK":
        image = Image.frombytes("CMYK", (9, 6), pixels.astype(np.uint8).tobytes())
    else:
        image = Image.fromarray(pixels.astype(dtype))
    if mode == "P":
        image = image.convert("P")
    assert image.mode == mode
    path = tmp_path / f"image.{fmt}"
    image.save(path)
    got = read_image(path)
    assert got.shape == (6, 9, 3) and got.dtype == np.uint8
    assert np.array_equal(got, mmcv_imread_rgb(path))
    if fmt in LOSSY:  # (CMYK: Pillow and OpenCV round their CMYK -> RGB conversions differently)
        assert np.abs(got.astype(int) - np.asarray(Image.open(path).convert("RGB"))).max() <= 2
    image, shown = two_halves(mode)
    image.save(path)
    got = read_image(path).astype(int)
    if fmt in LOSSY:  # away from the colour edge, where chroma subsampling blurs
        far = np.abs(np.arange(shown.shape[1]) - shown.shape[1] // 2) >= 4
        assert np.abs(got - shown)[:, far].max() <= 3, got[0]
    else:
        assert np.array_equal(got, shown), got[0]


def test_labels_read_as_mmseg_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (5, 6), dtype=np.uint8)
    cases = {"grey.png": Image.fromarray(ids), "bits.png": Image.fromarray(ids % 2 == 1)}
    cases["palette.png"] = Image.fromarray(ids)
    cases["palette.png"].putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())  # L -> P: indices = ids
    cases["sixteen.png"] = Image.fromarray(ids.astype(np.uint16))
    for name, im in cases.items():
        im.save(tmp_path / name)
        got = read_label(tmp_path / name)
        assert got.ndim == 2 and got.dtype.kind == "u", name
        assert np.array_equal(got, mmseg_load_annotations(tmp_path / name)), name
    # 16-bit values are kept; mmseg's astype(uint8) would turn 300 into 44, a valid class
    wide = ids.astype(np.uint16) * 10
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got = read_label(tmp_path / "wide.png")
    assert got.dtype == np.uint16 and np.array_equal(got, wide)
    assert np.array_equal(got.astype(np.uint8), mmseg_load_annotations(tmp_path / "wide.png"))
    # a label one pixel high stays (1, W): mmseg's squeeze would make it 1-D
    Image.fromarray(ids[:1]).save(tmp_path / "row.png")
    assert read_label(tmp_path / "row.png").shape == (1, 6)


def test_sixteen_bit_label_value_beyond_the_classes_is_named(tmp_path):
    root = tmp_path / "ds"
    for sub in ("images", "annotations"):
        (root / sub / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "images" / "val" / "a.png")
    Image.fromarray(np.full((4, 5), 260, np.uint16)).save(root / "annotations" / "val" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: label values \[260\] \(20 pixels\) are outside \[0, 4\)"):
        FolderSegmentation(root, "val", num_classes=4)[0]


def test_unreadable_files_are_named(tmp_path, capfd):
    write_png(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint64), 2, 8)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) - 20])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    for name, problem in [("cut.png", "cannot decode image"), ("empty.jpg", "empty file"),
                          ("text.jpg", "cannot decode image"), ("folder.png", "cannot read image"),
                          ("absent.png", "file not found")]:
        with pytest.raises(DataError, match=problem) as caught:
            read_image(tmp_path / name)
        assert caught.value.path == str(tmp_path / name) and "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""  # OpenCV's and libpng's own complaints silenced: one error, ours
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="single-channel.*got mode RGB"):
        read_label(tmp_path / "colour.png")
