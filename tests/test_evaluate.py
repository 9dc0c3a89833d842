"""python -m setr.evaluate: mmseg's test pipeline pixel for pixel, the training loop's numbers,
the same numbers on two processes as on one, and clear errors."""
import json
import os
import socket
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import setr
from setr.data.ade20k import ADE20K_PALETTE
from setr.evaluate import main
from setr.predict import main as predict_main
from jobs import finish, kill_leftovers, run, start  # noqa: F401 (kill_leftovers is a fixture)
from test_data import ade_root, shared_data  # noqa: F401 (ade_root is a fixture)

ADE_NAMES = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
# a tie: the top two logits closer than float32 rounding of a batched against a one-window forward
# (measured: 1e-7 on torch 2.11); a class within TIE of the best one is an equally right answer
TIE = 1e-5


@pytest.fixture
def camvid_root(shared_dir):
    return shared_data(shared_dir, "camvid_segnet_subset")


def mmseg_format_checkpoint(path, head, num_classes, img_size, **kw):
    """A ViT-tiny SETR saved as mmseg saves its checkpoints (state_dict + mmseg's own meta, no
    export meta), with BatchNorm statistics that are not the identity. Returns (path, model in
    eval mode)."""
    torch.manual_seed(0)
    model = setr.build_setr(head, backbone="vit_tiny", num_classes=num_classes, img_size=img_size, impl="sdpa",
                            **kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"meta": {"mmseg_version": "0.20.0", "CLASSES": ["x"] * num_classes}, "state_dict": model.state_dict()},
               path)
    return str(path), model


@pytest.fixture(scope="module")
def mmseg_pup(tmp_path_factory):
    """(path, model): a SETR-PUP in mmseg's checkpoint format, ViT-tiny sized so that a 512x512
    window runs in about a second on a CPU."""
    return mmseg_format_checkpoint(tmp_path_factory.mktemp("mmseg") / "setr_pup_tiny_ade20k.pth", "pup", 150, 512)


def mmseg_test_pipeline(model, path, scale=(2048, 512), crop=512, stride=341, num_classes=150):
    """mmseg 1.2.2's ADE20K test pipeline from its published description, independently of
    setr.data / setr.inference: LoadImageFromFile (cv2, BGR) -> Resize(scale, keep_ratio) with
    mmcv's rescale rule and cv2 INTER_LINEAR -> SegDataPreProcessor (bgr_to_rgb, (x - mean) / std)
    -> slide inference -> logits resized bilinear (align_corners=False) to the original size.
    Returns the (150, H, W) logits (argmax: the label map)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    x = ((x - mean) / std)[None]
    preds = torch.zeros(1, num_classes, new_h, new_w)
    count = torch.zeros(1, 1, new_h, new_w)
    h_grids = max(new_h - crop + stride - 1, 0) // stride + 1
    w_grids = max(new_w - crop + stride - 1, 0) // stride + 1
    with torch.no_grad():
        for i in range(h_grids):
            for j in range(w_grids):
                y2, x2 = min(i * stride + crop, new_h), min(j * stride + crop, new_w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                preds[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=(h, w), mode="bilinear", align_corners=False)[0]


def label_ties(got, logits, where):
    """Check a label map against mmseg_test_pipeline's logits: equal wherever the answer is defined,
    another class only where it ties the best logit (within TIE). Returns the number of ties."""
    ref, best = logits.argmax(dim=0).numpy(), logits.max(dim=0).values
    assert got.shape == ref.shape, where
    differ = torch.from_numpy(got != ref)
    chosen = logits.gather(0, torch.from_numpy(got).long()[None])[0]
    assert (best - chosen)[differ].le(TIE).all(), (where, int(differ.sum()))
    return int(differ.sum())


def test_label_maps_equal_mmseg_test_pipeline_on_ade20k(ade_root, mmseg_pup, tmp_path, capsys):
    ckpt, model = mmseg_pup
    images = [os.path.join(ade_root, "images", "validation", f"{n}.jpg") for n in ADE_NAMES]
    assert predict_main(images + ["--checkpoint", ckpt, "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert main(["--checkpoint", ckpt, "--data-root", ade_root, "--out", str(tmp_path / "eval"), "--device", "cpu",
                 "--save-predictions", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    ties = 0
    for name, path in zip(ADE_NAMES, images):
        logits = mmseg_test_pipeline(model, path)
        for folder in ("pred", "eval"):
            png = Image.open(tmp_path / folder / f"{name}_label.png")
            assert png.mode == "P" and tuple(png.getpalette()[3:6]) == ADE20K_PALETTE[1]
            ties += label_ties(np.array(png), logits, (name, folder))
    assert ties <= 10  # ties are rare: a handful of the ~3 x 2 x 10^5 pixels
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_images"] == 3 and len(metrics["IoU"]) == 150 and metrics["class_names"][0] == "wall"
    assert metrics["images_per_s"] > 0 and (metrics["mode"], metrics["crop_size"], metrics["stride"]) == ("slide", 512, 341)
    assert "chest of drawers" in out and "images/s" in out and f"mIoU {metrics['mIoU']:.2f}" in out


def test_evaluate_equals_the_training_loops_evaluation(camvid_root, tmp_path, capsys):
    """A short training run evaluates at its end and exports; setr.evaluate on the export and the
    same split gives the numbers the training loop logged."""
    from train.main import main as train_main

    work = tmp_path / "run"
    assert train_main(["--device", "cpu", "--preset", "demo", "--head", "pup", "--dataset", "folder",
                       "--data-root", camvid_root, "--num-classes", "11", "--ignore-index", "11",
                       "--max-iters", "2", "--batch-size", "2", "--ckpt-interval", "0", "--eval-interval", "0",
                       "--eval.max_samples", "4", "--num-workers", "0", "--metrics.progress_bar", "off",
                       "--work-dir", str(work)]) == 0
    with open(work / "metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if r["event"] == "eval"][-1]
    assert main(["--checkpoint", str(work / "model_final.pth"), "--dataset", "folder", "--data-root", camvid_root,
                 "--max-samples", "4", "--impl", "eager", "--num-workers", "0", "--out", str(tmp_path / "eval")]) == 0
    got = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert got["num_images"] == logged["num_images"] == 4
    assert got["mIoU"] == logged["mIoU"] and got["aAcc"] == logged["aAcc"] and got["mAcc"] == logged["mAcc"]
    assert [v for v in got["IoU"] if v is not None] == [v for v in logged["IoU"] if v != "nan"]
    assert (got["crop_size"], got["stride"], got["scale"]) == (64, 43, [256, 64])  # the run's eval settings


def _tiny_export(path, classes=11):
    torch.manual_seed(1)
    model = setr.build_setr("naive", backbone="vit_tiny", num_classes=classes, img_size=64, ignore_index=11)
    setr.export_model(model, path, class_names=[f"c{i}" for i in range(classes)],
                      eval=dict(mode="slide", crop_size=[64, 64], stride=[43, 43], scale=[256, 64]))
    return str(path)


def test_two_processes_equal_one(camvid_root, tmp_path, capsys):
    ckpt = _tiny_export(tmp_path / "tiny.pth")
    common = ["--checkpoint", ckpt, "--dataset", "folder", "--data-root", camvid_root, "--max-samples", "5",
              "--num-workers", "0", "--save-predictions", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "setr.evaluate"] + common + ["--out", str(tmp_path / "two")]
    code, output, errors = run(cmd, 180)
    assert code == 0, (output + errors)[-3000:]
    one = json.load(open(tmp_path / "one" / "metrics.json"))
    two = json.load(open(tmp_path / "two" / "metrics.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["num_images"] == one["num_images"] == 5
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "class_names"):
        assert two[key] == one[key], key
    pngs = sorted(p for p in os.listdir(tmp_path / "one") if p.endswith("_label.png"))
    assert len(pngs) == 5 and pngs == sorted(p for p in os.listdir(tmp_path / "two") if p.endswith("_label.png"))
    for p in pngs:
        assert np.array_equal(np.array(Image.open(tmp_path / "one" / p)), np.array(Image.open(tmp_path / "two" / p)))


def test_a_mistake_under_torchrun_is_said_once(tmp_path):
    """Two ranks (the environment torchrun gives them, without its launcher's start-up time) that
    both fail to set up (rank 1 on the checkpoint, rank 0 on a flag before it): rank 0 says why, rank
    1 exits as silently; neither leaves --out behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = []
    for rank, mistake in enumerate([["--max-samples", "0"], []]):
        cmd = [sys.executable, "-m", "setr.evaluate", "--checkpoint", str(tmp_path / "absent.pth"), "--dataset",
               "synthetic", "--device", "cpu", "--out", str(tmp_path / "out"), *mistake]
        jobs.append(start(cmd, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port)))
    results = [finish(proc, marker, timeout=120) for proc, marker in jobs]
    output = "".join(out for _, out in results)
    assert [code for code, _ in results] == [2, 2], output[-3000:]
    assert output.count("error: ") == 1 and "error: --max-samples must be >= 1" in output, output[-3000:]
    assert not (tmp_path / "out").exists()


def test_bad_input_is_named(camvid_root, ade_root, tmp_path, capsys):
    ckpt = _tiny_export(tmp_path / "tiny.pth")
    args = ["--checkpoint", ckpt, "--num-workers", "0", "--device", "cpu", "--max-samples", "1"]
    assert main(args + ["--data-root", ade_root, "--out", str(tmp_path / "a")]) == 2
    assert "ADE20K has 150 classes" in capsys.readouterr().err
    for flags, expected in [(["--max-samples", "0"], "--max-samples must be >= 1"),
                            (["--max-samples", "-1"], "--max-samples must be >= 1"),
                            (["--num-workers", "-1"], "--num-workers must be >= 0")]:
        assert main(args + flags + ["--dataset", "folder", "--data-root", camvid_root, "--out", str(tmp_path / "a")]) == 2
        _one_line_error(capsys, expected)
    assert not (tmp_path / "a").exists()  # refused starts leave no output folder behind
    assert main(args + ["--dataset", "folder", "--data-root", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(args + ["--dataset", "folder", "--data-root", camvid_root, "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(args + ["--dataset", "folder", "--data-root", camvid_root, "--out", str(tmp_path / "c")]) == 2
    assert "metrics.json exists" in capsys.readouterr().err
    assert main(args + ["--dataset", "folder", "--data-root", camvid_root, "--out", str(tmp_path / "c"),
                        "--overwrite", "--aug", "--mode", "whole"]) == 0
    again = json.load(open(tmp_path / "c" / "metrics.json"))
    assert again["aug"] and again["mode"] == "whole" and again["num_images"] == 1
    assert main(args + ["--checkpoint", str(tmp_path / "none.pth"), "--data-root", ade_root]) == 2
    assert "none.pth" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A training run as the README's first command makes it (the demo preset, on the built-in
    synthetic data), shortened: its run dir."""
    from train.main import main as train_main

    work = tmp_path_factory.mktemp("demo") / "demo"
    assert train_main(["--device", "cpu", "--preset", "demo", "--max-iters", "2", "--batch-size", "2",
                       "--ckpt-interval", "0", "--eval-interval", "0", "--data.synthetic_size", "48,64",
                       "--data.synthetic_val_samples", "3", "--num-workers", "0", "--metrics.progress_bar", "off",
                       "--work-dir", str(work)]) == 0
    return work


def test_the_demo_run_is_evaluable_on_its_own_data(demo_run, tmp_path, capsys):
    """`python -m setr.evaluate --checkpoint work_dirs/demo`: no dataset flags, the run's synthetic
    validation split (its size, count and seed), the numbers the training loop logged."""
    with open(demo_run / "metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if r["event"] == "eval"][-1]
    capsys.readouterr()
    assert main(["--checkpoint", str(demo_run), "--impl", "eager", "--num-workers", "0",
                 "--out", str(tmp_path / "eval")]) == 0, capsys.readouterr().err
    got = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert (got["dataset"], got["data_root"], got["num_images"]) == ("synthetic", None, 3)
    assert got["mIoU"] == logged["mIoU"] and got["aAcc"] == logged["aAcc"] and got["class_names"][0] == "background"
    assert main(["--checkpoint", str(demo_run), "--data-root", str(tmp_path), "--out", str(tmp_path / "e2")]) == 2
    assert "not used by --dataset synthetic" in capsys.readouterr().err


def test_predict_says_a_demo_model_knows_only_synthetic_scenes(demo_run, ade_root, tmp_path, capsys):
    image = os.path.join(ade_root, "images", "validation", "ADE_val_00000003.jpg")
    assert predict_main([image, "--checkpoint", str(demo_run), "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "knows only synthetic scenes" in capsys.readouterr().err


def _one_line_error(capsys, *expected):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(text in err for text in expected), err
    return err


def test_data_and_output_problems_are_one_line(camvid_root, tmp_path, capsys):
    """Labels out of range for the checkpoint (an 8-class demo-like model on CamVid), a corrupt image
    met by a DataLoader worker, an --out that cannot be written: one line each, exit 2."""
    torch.manual_seed(0)
    ckpt = tmp_path / "demo_like.pth"
    setr.export_model(setr.build_setr("pup", backbone="vit_tiny", num_classes=8, img_size=64), ckpt,
                      class_names=[f"c{i}" for i in range(8)],
                      eval=dict(mode="slide", crop_size=[64, 64], stride=[43, 43], scale=[256, 64]))
    args = ["--checkpoint", str(ckpt), "--device", "cpu", "--max-samples", "1", "--num-workers", "0"]
    assert main(args + ["--dataset", "folder", "--data-root", camvid_root, "--out", str(tmp_path / "a")]) == 2
    line = _one_line_error(capsys, "label values [", "outside [0, 8)", "demo_like.pth predicts 8 classes")
    assert os.path.join(camvid_root, "annotations", "validation") in line
    root = tmp_path / "data"
    for sub in ("images", "annotations"):
        (root / sub / "validation").mkdir(parents=True)
    (root / "images" / "validation" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "annotations" / "validation" / "a.png")
    args[-1] = "1"  # --num-workers 1: the error is met in a worker process
    assert main(args + ["--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, os.path.join(str(root), "images", "validation", "a.png"), "cannot decode image")
    (tmp_path / "file").write_text("")
    assert main(args + ["--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "file" / "o")]) == 2
    _one_line_error(capsys, f"--out {tmp_path / 'file' / 'o'}: cannot write there")
    (tmp_path / "text.pth").write_text("hello\n")
    assert main(["--checkpoint", str(tmp_path / "text.pth"), "--data-root", str(root), "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "text.pth: not a readable PyTorch checkpoint")


def test_run_config_is_found_from_every_name_of_a_run(demo_run, tmp_path):
    from setr.run_dir import CheckpointError, latest_checkpoint, run_config

    names = [demo_run, demo_run / "model_final.pth", demo_run / "checkpoints", demo_run / "checkpoints" / "latest",
             latest_checkpoint(str(demo_run))]
    assert [run_config(name)["data"]["dataset"] for name in names] == ["synthetic"] * 5
    assert run_config(tmp_path) is None and run_config(tmp_path / "model.pth") is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        run_config(tmp_path)
