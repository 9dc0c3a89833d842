"""python -m train.plot: curves of runs written by the trainer's logger, as one valid PNG."""
import json

import numpy as np
from PIL import Image

from train.logger import Logger
from train.plot import draw, main, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(work_dir, seed, iters=30, resumed_at=None):
    """metrics.jsonl through the trainer's Logger, with the keys the trainer logs."""
    rng = np.random.default_rng(seed)
    log = Logger(str(work_dir), rank=0, max_iters=iters, progress_bar="off", tensorboard=False)
    for it in list(range(1, iters + 1)) + list(range(resumed_at or iters + 1, iters + 1)):
        loss = 3.0 / it ** 0.3 + 0.05 * rng.random()
        log.event("train", it, {"loss": loss, "loss_decode": 0.7 * loss, "loss_aux0": 0.3 * loss, "loss_aux1": 0.2 * loss,
                                "loss_aux2": 0.1 * loss, "lr": 0.01 * (1 - it / iters) ** 0.9,
                                "lr_head": 0.1 * (1 - it / iters) ** 0.9, "grad_norm": 1 + rng.random(),
                                "img_per_s": 20 + rng.random(), "mfu": None, "data_wait": 0.1 * rng.random()})
        if it % 10 == 0:
            log.event("eval", it, {"mIoU": 10.0 * it ** 0.5, "mAcc": 20.0, "aAcc": 50.0, "IoU": [float("nan"), 1.0]})
    log.close()


def test_plot_overlays_runs_into_one_png(tmp_path, capsys):
    _fake_run(tmp_path / "a", 0)
    _fake_run(tmp_path / "b", 1, iters=20, resumed_at=15)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "iter": 2')  # a record cut short by a crash
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = tmp_path / "a" / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # curves were drawn, not a blank canvas
    other = tmp_path / "plots" / "both.png"
    assert main([str(tmp_path / "b"), "--out", str(other)]) == 0
    assert other.read_bytes()[:8] == PNG_SIGNATURE and not list(tmp_path.glob("plots/*.tmp*"))


def test_plot_names_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "checkpoint", "iter": 3}) + "\n")
    assert main([str(tmp_path)]) == 2
    assert "no train or eval records" in capsys.readouterr().err


def test_every_curve_of_a_panel_has_its_own_style(tmp_path):
    """Colour per run; within a run, total, decode and aux0-2 each drawn differently."""
    _fake_run(tmp_path / "a", 0)
    _fake_run(tmp_path / "b", 1)
    fig = draw([("a", read_metrics(tmp_path / "a")), ("b", read_metrics(tmp_path / "b"))])
    loss = fig.axes[0]
    labels = [line.get_label() for line in loss.lines]
    assert labels == [f"{run} {term}" for run in "ab" for term in ("total", "decode", "aux0", "aux1", "aux2")]
    looks = [(line.get_color(), line.get_linestyle(), line.get_marker(), line.get_linewidth()) for line in loss.lines]
    assert len(set(looks)) == len(looks)
    assert len({look[0] for look in looks[:5]}) == 1 and looks[0][0] != looks[5][0]  # one colour per run
    assert len({look[1:] for look in looks[:5]}) == 5  # told apart without colour


def test_plot_output_that_cannot_be_written_is_named(tmp_path, capsys):
    _fake_run(tmp_path / "a", 0, iters=3)
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "a"), "--out", str(tmp_path / "file" / "curves.png")]) == 2
    assert "curves.png: cannot write there" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
