"""Runs that fail fast and lose nothing: bad samples on any rank, dying ranks and launchers, stop
signals, full disks, damaged checkpoints, reused work dirs, and what predict accepts.

Process tests run their jobs with tests/jobs.py: a timeout that fails the test instead of hanging,
and a check that no process of the job is left."""
import errno
import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from setr import run_dir
from setr.data import DataError, FolderSegmentation, TrainSamples
from setr.predict import PredictError, build_model
from train import checkpoint as ckpt
from train.logger import BadSamples
from train.main import main

from jobs import (children, finish, job_pids, kill_leftovers, python_main, rank_pid, read_line,  # noqa: F401
                  run_job, setr_train, start, torchrun, train_losses, train_records, wait_for_iterations)

NUM_CLASSES = 4
# The demo model on a 4-class folder dataset, 32x32 crops, batch 2 (one image per rank).
ARGS = ["--device", "cpu", "--preset", "demo", "--head", "pup", "--deterministic", "--log-interval", "1",
        "--eval-interval", "0", "--metrics.progress_bar", "off", "--dataset", "folder", "--num-classes",
        str(NUM_CLASSES), "--ignore-index", "255", "--batch-size", "2", "--crop-size", "32",
        "--data.scale", "80,40", "--eval.crop_size", "32", "--eval.stride", "32", "--eval.scale", "80,40"]


# ------------------------------------------------------------------------------------------------
# a tiny folder dataset
# ------------------------------------------------------------------------------------------------

def _write_sample(root, split, name, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    for sub in ("images", "annotations"):
        os.makedirs(os.path.join(root, sub, split), exist_ok=True)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(os.path.join(root, "images", split, f"{name}.png"))
    Image.fromarray(rng.integers(0, NUM_CLASSES, size, dtype=np.uint8)).save(
        os.path.join(root, "annotations", split, f"{name}.png"))


def _dataset(tmp_path, n_train=4, n_val=2):
    root = str(tmp_path / "data")
    for i in range(n_train):
        _write_sample(root, "training", f"t{i}", i)
    for i in range(n_val):
        _write_sample(root, "validation", f"v{i}", 100 + i)
    return root


def _rank1_first_sample(root):
    """Stem of the training image rank 1 reads first (global position 1, seed 0)."""
    ds = FolderSegmentation(root, "training", NUM_CLASSES)
    return ds.names[TrainSamples(ds, 32, seed=0).dataset_index(1)]


# ------------------------------------------------------------------------------------------------
# bad samples, on the rank that reads them (2 gloo ranks, with and without a data worker)
# ------------------------------------------------------------------------------------------------

def _break_image(root, stem):
    with open(os.path.join(root, "images", "training", f"{stem}.png"), "wb") as f:
        f.write(b"not a png")
    return f"{stem}.png", "cannot decode image"


def _truncate_label(root, stem):
    path = os.path.join(root, "annotations", "training", f"{stem}.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return f"{stem}.png", "cannot decode label"


def _label_out_of_range(root, stem):
    path = os.path.join(root, "annotations", "training", f"{stem}.png")
    label = np.array(Image.open(path))
    label[0, :5] = 7
    Image.fromarray(label).save(path)
    return f"{stem}.png", "label values [7]"


def _size_mismatch(root, stem):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(os.path.join(root, "annotations", "training", f"{stem}.png"))
    return f"{stem}.png", "does not match image"


def _missing_label(root, stem):
    os.remove(os.path.join(root, "annotations", "training", f"{stem}.png"))
    return f"{stem}.png", "image has no label"


def _empty_split(root, _stem):
    for sub in ("images", "annotations"):
        shutil.rmtree(os.path.join(root, sub, "training"))
        os.makedirs(os.path.join(root, sub, "training"))
    return "training", "no images"


BAD_DATA = {"bad image": _break_image, "truncated label": _truncate_label, "label out of range": _label_out_of_range,
            "size mismatch": _size_mismatch, "missing label": _missing_label, "empty split": _empty_split}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_sample_on_one_rank_ends_the_job(tmp_path, case):
    """Read by rank 1 only (its first sample; with a data worker, or without for every other case),
    or found when the split is built: setr-train ends within 60 s with exit status 2 and the
    error (file, problem) printed once, without a launcher traceback."""
    root = _dataset(tmp_path)
    name, problem = BAD_DATA[case](root, _rank1_first_sample(root))
    workers = ["--num-workers", "0"] if list(BAD_DATA).index(case) % 2 else []
    args = ARGS + ["--data-root", root, "--max-iters", "3", "--work-dir", str(tmp_path / "run")] + workers
    code, out, seconds = run_job(setr_train(2) + args)
    assert code == 2 and seconds < 60, out[-3000:]
    errors = [line for line in out.splitlines() if "error: " in line and name in line]
    assert len(errors) == 1 and problem in errors[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    if case not in ("missing label", "empty split"):  # found by rank 1 while training
        assert errors[0].startswith("rank 1: error:"), errors
    assert not os.path.exists(tmp_path / "run" / "config.json")  # failed before it trained: no trace


# ------------------------------------------------------------------------------------------------
# dying ranks and launchers, stop signals (2 gloo ranks with a data worker each, or one process)
# ------------------------------------------------------------------------------------------------

def test_a_rank_killed_mid_run_ends_the_job_and_resume_is_bitwise(tmp_path):
    root, work = _dataset(tmp_path), str(tmp_path / "run")
    args = ARGS + ["--data-root", root, "--max-iters", "12", "--ckpt-interval", "2", "--work-dir", work,
                   "--eval.at_end", "false", "--checkpoint.export", "false"]
    proc, marker = start(torchrun(2) + args)
    wait_for_iterations(work, proc, 3)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    killed = time.time()
    code, out = finish(proc, marker, timeout=60)
    assert code != 0 and time.time() - killed < 60, out[-3000:]
    before = train_losses(work)
    assert max(before) < 12, "the run finished before the kill: nothing tested"
    saved = ckpt.latest_checkpoint(work)
    if int(saved[-8:]) == max(before):  # killed just after a checkpoint: resume from the one before it,
        shutil.rmtree(saved)  # so that some steps run twice (--resume auto falls back past the pointer)
        saved = ckpt.latest_checkpoint(work)
    code, out, _ = run_job(torchrun(2) + args + ["--resume", "auto"])
    assert code == 0 and f"resumed from {saved}" in out, out[-3000:]
    resumed = train_records(work)[len(before):]
    assert [r["iter"] for r in resumed] == list(range(int(saved[-8:]) + 1, 13))
    again = {r["iter"]: r["loss"] for r in resumed if r["iter"] in before}
    assert again and all(again[i] == before[i] for i in again), (again, before)  # bitwise


@pytest.mark.parametrize("how, launcher", [(signal.SIGKILL, torchrun), (signal.SIGTERM, setr_train)])
def test_a_killed_launcher_leaves_no_process(tmp_path, how, launcher):
    """torchrun killed: SIGKILL leaves nobody to stop the ranks (their own sessions): they notice
    and exit, and their data workers die with them. setr-train sent SIGTERM: the ranks checkpoint
    and it exits 143, saying nothing more."""
    root, work = _dataset(tmp_path), str(tmp_path / "run")
    proc, marker = start(launcher(2) + ARGS + ["--data-root", root, "--max-iters", "100000", "--ckpt-interval", "0",
                                               "--work-dir", work])
    wait_for_iterations(work, proc, 2)
    assert len(job_pids(marker)) >= 5  # the launcher, 2 ranks, a data worker each
    os.kill(proc.pid, how)
    code, out = finish(proc, marker, timeout=60)
    if how == signal.SIGTERM:
        stopped = max(train_losses(work))
        assert code == 143 and "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
        assert ckpt.latest_checkpoint(work).endswith(f"iter_{stopped:08d}")


@pytest.mark.parametrize("how, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signals_checkpoint_and_exit_128_plus_signal(tmp_path, capsys, how, status):
    """A plain process with a data worker: Ctrl-C (SIGINT to the whole foreground process group,
    workers included) or SIGTERM: final checkpoint, then exit 130 / 143; --resume auto continues
    from that checkpoint."""
    root, work = _dataset(tmp_path), str(tmp_path / "run")
    proc, marker = start(python_main() + ARGS + ["--data-root", root, "--max-iters", "100000", "--ckpt-interval",
                                                 "0", "--work-dir", work])
    wait_for_iterations(work, proc, 2)
    os.killpg(proc.pid, how)  # the process group of the job, as a terminal does
    code, out = finish(proc, marker, timeout=60)
    stopped = max(train_losses(work))
    assert code == status and f"stopped by {how.name}" in out, out[-3000:]
    assert ckpt.latest_checkpoint(work).endswith(f"iter_{stopped:08d}")
    assert _main(tmp_path, "--resume", "auto", "--eval.at_end", "false", "--checkpoint.export", "false",
                 iters=stopped + 1) == 0  # (the max_iters of a run may change)
    assert f"at iteration {stopped}:" in capsys.readouterr().out and max(train_losses(work)) == stopped + 1


def test_a_data_worker_is_stopped_by_a_plain_kill(tmp_path):
    root, work = _dataset(tmp_path), str(tmp_path / "run")
    proc, marker = start(python_main() + ARGS + ["--data-root", root, "--max-iters", "100000", "--work-dir", work])
    wait_for_iterations(work, proc, 2)
    workers = list(children(proc.pid))
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGTERM)
    code, out = finish(proc, marker, timeout=60)
    # the loader reports the dead worker by pid, or (killed mid-transfer) the broken connection
    died = [line for line in out.splitlines() if "RuntimeError: DataLoader worker" in line]
    assert code == 1, out[-3000:]
    assert (died and str(workers[0]) in died[0]) or "ConnectionResetError" in out, out[-3000:]
    assert not os.path.exists(f"/proc/{workers[0]}")


def test_a_rank_stuck_after_another_rank_failed_exits():
    """The safety net for a rank waiting in a collective that never fails (NCCL across nodes):
    once a rank has reported an error in the launcher's store, the others exit after a grace."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stuck = ("import time; from train import parallelize; parallelize._attempt = 'setr/fault-test/7'; "
             "parallelize.watch_job(grace=1.0); print('up', flush=True); time.sleep(60)")
    proc, marker = start([sys.executable, "-c", stuck], TORCHELASTIC_RUN_ID="fault-test",
                         TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                         RANK="1")
    assert read_line(proc, timeout=30).strip() == "up"
    store.add("setr/fault-test/7/errors", 1)  # what a failing rank does before it prints its error
    begin = time.time()
    code, out = finish(proc, marker, timeout=30)
    assert code == 1 and "rank 1: another rank failed: exiting" in out and time.time() - begin < 10, out


# ------------------------------------------------------------------------------------------------
# in one process: work dirs, checkpoint faults, bad samples skipped, predict
# ------------------------------------------------------------------------------------------------

def _main(tmp_path, *extra, iters=2):
    root = str(tmp_path / "data")
    if not os.path.isdir(root):
        _dataset(tmp_path)
    return main(ARGS + ["--data-root", root, "--num-workers", "0", "--max-iters", str(iters),
                        "--work-dir", str(tmp_path / "run"), *extra])


def _snapshot(folder):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs}


def test_a_work_dir_holding_a_run_is_never_reused_silently(tmp_path, capsys):
    assert _main(tmp_path) == 0
    capsys.readouterr()
    files = _snapshot(tmp_path / "run")
    assert _main(tmp_path) == 2  # the same command again
    err = capsys.readouterr().err
    assert "holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert _main(tmp_path, "--resume", "auto", "--overwrite") == 2
    assert "contradict" in capsys.readouterr().err
    assert _main(tmp_path, "--resume", "auto") == 0  # finished: says so, writes nothing
    assert "already finished (iteration 2 of 2)" in capsys.readouterr().out
    assert _main(tmp_path, "--resume", "auto", "--num-classes", "5", "--lr", "0.5", "--log-interval", "2") == 2
    err = capsys.readouterr().err  # another run's config: refused, naming what differs (log_interval may)
    assert "has another config (model.num_classes 4 there, 5 here; optim.lr 0.02 there, 0.5 here)" in err, err
    newest = ckpt.iteration_dir(str(tmp_path / "run"), 2)  # a checkpoint of another work dir: its meta's config
    assert _main(tmp_path, "--resume", newest, "--work-dir", str(tmp_path / "new"), "--lr", "0.5") == 2
    assert f"--resume {newest}: the checkpoint {newest} has another config (optim.lr 0.02 there, 0.5 here)" \
        in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == files and not (tmp_path / "new").exists()
    (tmp_path / "run" / "curves.png").write_bytes(b"train.plot's default output")
    assert _main(tmp_path, "--overwrite", "--eval.at_end", "false", iters=1) == 0  # asked: a fresh run
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [r["iter"] for r in map(json.loads, f)] == [1, 1]  # its train and checkpoint events only
    assert [it for it, _ in ckpt.complete_checkpoints(str(tmp_path / "run"))] == [1]
    assert not (tmp_path / "run" / "curves.png").exists()


def test_a_start_that_fails_before_training_leaves_no_trace(tmp_path, capsys, monkeypatch):
    """--pretrained timm/... offline (found once the model is built) and a bad image read in the
    first iteration: nothing is written into the work dir, and the same command runs once fixed."""
    from huggingface_hub import constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert _main(tmp_path, "--pretrained", "timm/vit_tiny_patch16_224.augreg_in21k") == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    ds = FolderSegmentation(str(tmp_path / "data"), "training", NUM_CLASSES)
    first = ds.names[TrainSamples(ds, 32, seed=0).dataset_index(0)]
    _break_image(str(tmp_path / "data"), first)
    assert _main(tmp_path) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # not even created
    _write_sample(str(tmp_path / "data"), "training", first, int(first[1:]))
    assert _main(tmp_path) == 0


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(tmp_path, capsys, monkeypatch):
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if "iter_00000002" in str(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, "No space left on device", getattr(f, "name", str(f)))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full)
    assert _main(tmp_path, "--ckpt-interval", "1", iters=3) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "iter_00000002.tmp" in err and "No space left" in err
    work = str(tmp_path / "run")
    assert ckpt.latest_checkpoint(work).endswith("iter_00000001")
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["iter_00000001", "latest"]
    monkeypatch.setattr(torch, "save", save)
    assert _main(tmp_path, "--ckpt-interval", "1", "--resume", "auto", iters=3) == 0
    assert "at iteration 1" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated shard", "missing metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    assert _main(tmp_path, "--ckpt-interval", "1", "--eval.at_end", "false", iters=2) == 0
    newest = ckpt.iteration_dir(str(tmp_path / "run"), 2)
    if damage == "truncated shard":
        with open(os.path.join(newest, "__0_0.distcp"), "r+b") as f:
            f.truncate(100)
    else:
        os.remove(os.path.join(newest, ".metadata"))
    capsys.readouterr()
    assert _main(tmp_path, "--ckpt-interval", "1", "--resume", "auto", "--eval.at_end", "false", iters=3) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is corrupt or incomplete" in out
    assert f"resuming from the older {ckpt.iteration_dir(str(tmp_path / 'run'), 1)}" in out
    assert "at iteration 1" in out


def test_skip_bad_samples_warns_once_counts_and_resumes_bitwise(tmp_path, capsys):
    root = _dataset(tmp_path)
    name, _ = _break_image(root, _rank1_first_sample(root))
    skip = ["--data.on_bad_sample", "skip", "--data.max_bad_fraction", "0.3", "--ckpt-interval", "2",
            "--eval.at_end", "false", "--checkpoint.export", "false"]
    assert _main(tmp_path, *skip, iters=4) == 0  # 8 positions: 2 epochs of 4 images, the bad one twice
    out = capsys.readouterr().out
    assert out.count(f"bad sample {os.path.join(root, 'images', 'training', name)}: cannot decode image") == 1
    full = train_losses(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [r["bad_samples"] for r in map(json.loads, f) if r["event"] == "train"][-1] == 2
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_00000004")
    os.remove(tmp_path / "run" / "metrics.jsonl")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_00000002")
    assert _main(tmp_path, *skip, "--resume", "auto", iters=4) == 0
    resumed = train_losses(tmp_path / "run")
    assert [resumed[i] for i in (3, 4)] == [full[i] for i in (3, 4)]  # bitwise
    other = next(f"t{i}" for i in range(4) if f"t{i}.png" != name)
    _break_image(root, other)  # 2 bad of 4: more than the 1 that a fraction of 0.1 (0.4 files) still allows
    assert _main(tmp_path, "--data.on_bad_sample", "skip", "--data.max_bad_fraction", "0.1", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "2 of the 4 training samples are bad" in err and "raise --data.max_bad_fraction" in err


def test_a_small_dataset_may_always_lose_one_sample():
    """1 bad file of 74 is more than --data.max_bad_fraction 0.01 of them, yet skipped; the next
    one stops the run, and the error says which flag to raise."""
    warnings = []
    log = type("Log", (), {"warning": lambda self, msg, every_rank=False: warnings.append(msg)})()
    small = BadSamples(log, 74, 0.01, torch.device("cpu"))
    small.note("a.png", "cannot decode image")
    small.note("a.png", "cannot decode image")  # the same file again: replaced, not a new bad file
    assert small.replaced == 2 and len(warnings) == 1
    with pytest.raises(DataError, match=r"b\.png: 2 of the 74 training samples are bad, more than the 1 that "
                                        r"--data\.max_bad_fraction 0\.01 allows.*raise --data\.max_bad_fraction"):
        small.note("b.png", "cannot decode image")
    large = BadSamples(log, 1000, 0.01, torch.device("cpu"))
    for i in range(10):
        large.note(f"{i}.png", "cannot decode image")
    with pytest.raises(DataError, match="11 of the 1000 training samples are bad, more than the 10"):
        large.note("10.png", "cannot decode image")


def test_predict_loads_what_training_writes(tmp_path):
    assert _main(tmp_path, "--ckpt-interval", "1") == 0
    work = str(tmp_path / "run")
    final, info = build_model(work)  # the run dir: its model_final.pth
    assert info["num_classes"] == NUM_CLASSES and info["head"] == "pup"
    expect, names = final.state_dict(), info["class_names"]
    for path in (ckpt.iteration_dir(work, 2), os.path.join(work, "checkpoints", "latest")):
        model, info = build_model(path)  # the sharded checkpoint, consolidated in this process
        assert info["class_names"] == names and info["eval"]["crop_size"] == [32, 32]
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in expect.items())
    os.remove(os.path.join(work, run_dir.FINAL))
    model, _ = build_model(work)  # without model_final.pth: the latest checkpoint
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in expect.items())
    os.remove(os.path.join(ckpt.iteration_dir(work, 2), ".metadata"))
    with pytest.raises(PredictError, match=f"checkpoint {ckpt.iteration_dir(work, 2)} is corrupt"):
        build_model(ckpt.iteration_dir(work, 2))
    with pytest.raises(PredictError, match="not a complete checkpoint directory"):
        build_model(str(tmp_path))

