"""python -m setr.predict: outputs a person looks at, and clear errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from setr.files import check_writable_dir
from setr.predict import main, save_outputs

NAMES = ["ADE_val_00000002", "ADE_val_00000003"]
SIZES = {"ADE_val_00000002": (364, 500), "ADE_val_00000003": (300, 400)}
CLASSES = ["background", "a", "b", "c", "d", "e"]
PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


@pytest.fixture
def images(shared_dir):
    root = os.path.join(shared_dir, "data", "ade20k_sceneparsing_samples", "images",
                        "validation")
    if not os.path.isdir(root):
        pytest.skip(f"{root} not found")
    return [os.path.join(root, n + ".jpg") for n in NAMES]


@pytest.fixture(scope="module")
def tiny_model():
    setr = pytest.importorskip("setr")
    torch.manual_seed(0)
    return setr.build_setr("pup", backbone="vit_tiny", num_classes=len(CLASSES), img_size=64)


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    import setr

    path = tmp_path / "tiny.pth"
    setr.export_model(tiny_model, path, class_names=CLASSES, palette=PALETTE)
    return str(path)


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_save_outputs_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    label = rng.integers(0, 6, (7, 9))
    lp, op = save_outputs(image, label, PALETTE, tmp_path, "x")
    assert os.path.basename(lp) == "x_label.png" and os.path.basename(op) == "x_overlay.png"
    im = Image.open(lp)
    assert im.mode == "P" and np.array_equal(np.array(im), label)
    assert tuple(im.getpalette()[3:6]) == PALETTE[1]
    overlay = np.array(Image.open(op))
    colour = np.asarray(PALETTE, dtype=np.uint16)[label]
    assert np.array_equal(overlay, (image.astype(np.uint16) + colour + 1) // 2)


def test_predict_end_to_end(tmp_path, images, checkpoint, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run([*images, "--checkpoint", checkpoint, "--head", "pup", "--out", out,
                              "--scale", 128, 96, "--device", "cpu"], capsys)
    assert code == 0, err
    for path, name in zip(images, NAMES):
        assert name in stdout
        label = Image.open(out / f"{name}_label.png")
        overlay = Image.open(out / f"{name}_overlay.png")
        H, W = SIZES[name]
        assert label.size == overlay.size == (W, H) and label.mode == "P"
        ids = np.array(label)
        assert ids.max() < len(CLASSES)
        image = np.array(Image.open(path).convert("RGB"))
        colour = np.asarray(PALETTE, dtype=np.uint16)[ids]
        assert np.array_equal(np.array(overlay), (image + colour + 1) // 2)
    # whole-image mode and ms+flip run too
    code, _, err = _run([images[1], "--checkpoint", checkpoint, "--out", out, "--mode", "whole",
                         "--aug", "--scale", 96, 64], capsys)
    assert code == 0, err


def test_plain_state_dict_checkpoint(tmp_path, images, tiny_model, capsys):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": tiny_model.state_dict()}, path)  # no meta: inferred from keys
    code, _, err = _run([images[1], "--checkpoint", path, "--out", tmp_path / "o",
                         "--scale", 96, 64, "--crop-size", 64], capsys)
    assert code == 0, err
    assert np.array(Image.open(tmp_path / "o" / f"{NAMES[1]}_label.png")).max() < len(CLASSES)


def test_bad_image_is_reported_and_others_still_written(tmp_path, images, checkpoint, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(open(images[0], "rb").read()[:2000])  # truncated jpeg
    code, _, err = _run([bad, images[1], "--checkpoint", checkpoint, "--out", tmp_path / "o",
                         "--scale", 96, 64], capsys)
    assert code == 1
    assert "broken.jpg" in err and "cannot" in err and "1 of 2 images failed" in err
    assert (tmp_path / "o" / f"{NAMES[1]}_overlay.png").exists()
    assert not (tmp_path / "o" / "broken_label.png").exists()


def test_bad_checkpoints_and_options(tmp_path, images, checkpoint, capsys):
    code, _, err = _run([images[0], "--checkpoint", tmp_path / "nope.pth"], capsys)
    assert code == 2 and "nope.pth: no such file" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    code, _, err = _run([images[0], "--checkpoint", junk], capsys)
    assert code == 2 and "junk.pth: not a readable PyTorch checkpoint" in err
    code, _, err = _run([images[0], "--checkpoint", checkpoint, "--head", "mla"], capsys)
    assert code == 2 and "holds a 'pup' model" in err
    code, _, err = _run([images[0], "--checkpoint", checkpoint, "--num-classes", 9], capsys)
    assert code == 2 and "cannot load" in err and "decode_head.conv_seg" in err
    code, _, err = _run([images[0], "--checkpoint", checkpoint, "--crop-size", 50], capsys)
    assert code == 2 and "--crop-size" in err and "patch size 16" in err
    code, _, err = _run([images[0], images[0], "--checkpoint", checkpoint], capsys)
    assert code == 2 and "same outputs" in err


def test_test_pipeline_defaults_to_the_checkpoint_eval_settings(tmp_path, images, tiny_model, capsys,
                                                                monkeypatch):
    import setr
    import setr.predict

    path = tmp_path / "trained.pth"
    setr.export_model(tiny_model, path, class_names=CLASSES, palette=PALETTE,
                      eval=dict(mode="whole", crop_size=[64, 64], stride=[48, 48], scale=[96, 64]))
    seen = []
    real = setr.predict.predict_image
    monkeypatch.setattr(setr.predict, "predict_image", lambda *a: seen.append(a[3:]) or real(*a))
    code, _, err = _run([images[1], "--checkpoint", path, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert seen[-1] == ("whole", False, (96, 64), (64, 64), (48, 48), 0)
    code, _, err = _run([images[1], "--checkpoint", path, "--out", tmp_path / "o", "--mode", "slide",
                         "--crop-size", 32], capsys)
    assert code == 0, err
    assert seen[-1] == ("slide", False, (96, 64), (32, 32), (21, 21), 0)  # flags win; stride follows the crop


def test_user_mistakes_are_one_line_and_bugs_say_so(tmp_path, images, checkpoint, capsys, monkeypatch):
    (tmp_path / "hello.pth").write_text("hello")  # a text file: torch.load fails with KeyError: 101
    (tmp_path / "lines.pth").write_text("some\nlines\n")  # ... or IndexError: pop from empty list
    (tmp_path / "file").write_text("")
    cases = [(["--checkpoint", tmp_path / "hello.pth"], "hello.pth: not a readable PyTorch checkpoint"),
             (["--checkpoint", tmp_path / "lines.pth"], "lines.pth: not a readable PyTorch checkpoint"),
             (["--checkpoint", checkpoint, "--out", tmp_path / "file" / "o"],
              f"--out {tmp_path / 'file' / 'o'}: cannot write there ({tmp_path / 'file'} is a file, not a folder)"),
             (["--checkpoint", checkpoint, "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
             (["--checkpoint", checkpoint, "--scale", 0, 64], "--scale must be two positive sizes"),
             (["--checkpoint", checkpoint, "--crop-size", 0], "--crop-size must be positive multiples of the patch"),
             (["--checkpoint", checkpoint, "--stride", 0], "--stride must be in [1, crop size 64], got 0")]
    for args, expected in cases:
        code, _, err = _run([images[0], "--out", tmp_path / "o", *args], capsys)
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # refused starts leave no output folder behind
    import setr.predict

    monkeypatch.setattr(setr.predict, "predict_image", lambda *a: 1 / 0)  # a bug of ours
    code, _, err = _run([images[0], "--checkpoint", checkpoint, "--out", tmp_path / "o", "--scale", 96, 64], capsys)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err and "a bug in this program" in err


def test_image_paths_are_checked_before_the_model_loads(tmp_path, images, checkpoint, capsys, monkeypatch):
    import setr.predict

    monkeypatch.setattr(setr.predict, "build_model", lambda *a: pytest.fail("the model was loaded"))
    for bad, expected in [(tmp_path / "absent.jpg", f"image {tmp_path / 'absent.jpg'}: no such file"),
                          (tmp_path, f"image {tmp_path}: a folder, not a file")]:
        code, _, err = _run([images[0], bad, "--checkpoint", checkpoint, "--out", tmp_path / "o"], capsys)
        assert code == 2 and err == f"error: {expected}\n", err
    assert not (tmp_path / "o").exists()


def test_check_writable_dir_creates_nothing(tmp_path):
    check_writable_dir(tmp_path)
    check_writable_dir(tmp_path / "new" / "deeper")
    assert os.listdir(tmp_path) == []  # neither the folders nor the probe file
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "o"):
        with pytest.raises(NotADirectoryError) as caught:
            check_writable_dir(path)
        assert caught.value.strerror == f"{tmp_path / 'file'} is a file, not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(PermissionError):
            check_writable_dir(tmp_path / "locked" / "o")
