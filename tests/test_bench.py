"""The benchmark harness: its logic (goals, batch search, ratios, data wait, merging, README
tables, failure reporting).

The scripts' end-to-end CPU smoke runs (kernels, train step, memory plan, README tables) are the
parts of `bench/gpu_check.py --dry-run`, checked in tests/test_gpu_check.py; the measured memory
profile (bench/memory.py without --estimate) runs on a GPU below. Timings here mean nothing.
"""
import json
import math
import os
import sys
import time
import types

import pytest
import torch

from bench import common, readme_tables, step, train_step
from bench import kernels as kernels_bench
from bench import memory as memory_bench
from train.flops import model_flops_utilization, peak_flops

ON_CPU = not torch.cuda.is_available()
# CPU-path assertions; the GPU paths: test_train_step_and_memory_quick_on_gpu
cpu_only = pytest.mark.skipif(not ON_CPU, reason="checks the CPU smoke path")
ENV_KEYS = ("date", "torch", "triton", "git_commit", "gpu", "python")


def read_results(outdir, name):
    with open(os.path.join(outdir, f"{name}.json")) as f:
        data = json.load(f)
    with open(os.path.join(outdir, f"{name}.md")) as f:
        md = f.read()
    env = data["environment"]
    assert all(k in env for k in ENV_KEYS), env
    if ON_CPU:
        assert env["gpu"] is None and common.cpu_warning() in md
    return data, md


# --- train_step ---------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [1, 5, 16, 64])
@pytest.mark.parametrize("start", [1, 8])
def test_largest_batch_doubles_then_bisects(cap, start):
    for limit in [0, 1, 2, 3, 7, 8, 9, 13, 16, 40, 64, 100]:
        calls = []

        def fits(b):
            assert 1 <= b <= cap
            calls.append(b)
            return b <= limit

        assert train_step.largest_batch(fits, start=start, cap=cap) == min(limit, cap)
        assert len(calls) <= 2 * math.ceil(math.log2(cap + 1)) + 2, calls


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bf16") == 835e12
    assert peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("Tesla T4", "bf16") is None and peak_flops(None, "bf16") is None
    assert model_flops_utilization(2e12, 100.0, 989e12, num_gpus=2) == pytest.approx(2e14 / (2 * 989e12))
    assert model_flops_utilization(2e12, 100.0, None) is None


def _train_row(variant, ips, **kw):
    return dict(mode="train", provider=variant, images_per_s=ips, batch=16, **kw)


def test_goal_lines_pass_and_miss():
    cuda = torch.device("cuda")  # goal_lines only looks at the device type
    rows = [_train_row("eager", 10.0), _train_row("eager+compile", 13.0),
            _train_row("triton", 16.0, mfu=0.55, mem_per_image_gib=2.3)]
    lines = train_step.goal_lines("pup", rows, cuda, gpu_gib=79.1)
    assert len(lines) == 5 and all(line.startswith("- PASS") for line in lines), lines
    rows[2].update(images_per_s=14.0, mfu=0.45, mem_per_image_gib=2.5)
    rows.append(dict(mode="train", provider="sdpa", error="boom"))
    lines = train_step.goal_lines("pup", rows, cuda, gpu_gib=79.1)
    assert [line.split(":")[0] for line in lines] == ["- MISS"] * 4 + ["- PASS"], lines
    assert "1.40x eager" in lines[0] and "1.08x eager+compile" in lines[1]
    # a bigger GPU cannot prove the 80 GB goal; other heads have no memory goal; CPU: no goals
    assert train_step.goal_lines("pup", rows, cuda, gpu_gib=139.8)[-1].startswith("- n/a")
    assert train_step.goal_lines("mla", rows, cuda, gpu_gib=79.1)[-1].startswith("- n/a")
    assert train_step.goal_lines("pup", rows, torch.device("cpu"))[0].startswith("- n/a")
    # batch 8 without a search: the batch-16 goal is not decided
    rows[2]["batch"] = 8
    assert "--find-max-batch" in train_step.goal_lines("pup", rows, cuda, gpu_gib=79.1)[-1]
    rows[2]["max_batch"] = 12
    assert train_step.goal_lines("pup", rows, cuda, gpu_gib=79.1)[-1].startswith("- MISS")
    rows[2] = dict(mode="train", provider="triton", batch=16, error="OOM at batch 16")
    lines = train_step.goal_lines("pup", rows, cuda, gpu_gib=79.1)
    assert lines[-1] == "- MISS: batch 16 of PUP fits on one 80 GB GPU (impl=triton: OOM at batch 16)"
    assert all(line.startswith("- n/a") for line in lines[:-1])


def test_oom_detection():
    assert train_step.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("compiled graph failed") from e
    except RuntimeError as wrapped:
        assert train_step.is_oom(wrapped)
    assert not train_step.is_oom(ValueError("shape mismatch"))


class _SlowSamples(torch.utils.data.Dataset):
    def __init__(self, delay_s):
        self.delay_s = delay_s

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64)


def test_data_wait_share_of_the_step():
    """A loader as slow as the step waits half of each step; one much faster than the step, almost none."""
    steps = []
    slow = torch.utils.data.DataLoader(_SlowSamples(0.02), batch_size=2)  # 40 ms per batch
    ms, wait_ms, share = step.time_loader_steps(lambda x, y: (steps.append(x.shape), time.sleep(0.04)), slow, 3,
                                                torch.device("cpu"))
    assert steps == [(2, 3, 4, 4)] * 3
    assert 70 < ms < 200 and 30 < wait_ms < 100 and 0.3 < share < 0.7, (ms, wait_ms, share)
    fast = torch.utils.data.DataLoader(_SlowSamples(0.0), batch_size=2)
    _, _, share = step.time_loader_steps(lambda x, y: time.sleep(0.04), fast, 3, torch.device("cpu"))
    assert share < 0.1


def test_loader_is_the_training_pipeline():
    loader = step.make_loader("pup", 2, 32, 8, 0, torch.device("cpu"))
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= set(range(8)) | {255}
    assert "0 workers" in loader.description


def test_append_keeps_other_variants_of_the_same_device(tmp_path):
    path = tmp_path / "train_step_pup.json"
    assert train_step.earlier_rows(str(path), ["eager"], None) == []
    rows = [dict(mode="train", provider="eager", ms=2.0), dict(mode="train", provider="triton", ms=1.0)]
    _write(path, dict(GPU_ENV, gpu=None), rows)
    assert train_step.earlier_rows(str(path), ["eager"], None) == rows[1:]
    with pytest.raises(SystemExit, match="not merged"):
        train_step.earlier_rows(str(path), ["eager"], "NVIDIA H200")


# --- kernels ---------------------------------------------------------------------------------

def test_kernels_harness_reports_failures(tmp_path, monkeypatch):
    def ok_run(quick=False, setr_only=False):
        base = dict(kernel="toy", mode="fwd", shape=[4, 4], dtype="float32")
        return [dict(base, provider=common.OURS, ms=1.0), dict(base, provider="eager", ms=3.0),
                dict(base, provider="apex", ms=None, error="ModuleNotFoundError: No module named 'apex'")]

    def boom_run(quick=False, setr_only=False):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(sys.modules, "bench.bench_ok", types.SimpleNamespace(run=ok_run))
    monkeypatch.setitem(sys.modules, "bench.bench_boom", types.SimpleNamespace(run=boom_run))
    monkeypatch.setattr(kernels_bench, "KERNEL_BENCHES", ("ok", "boom", "nothere"))
    rc = kernels_bench.main(["--only", "ok", "boom", "nothere", "--out", str(tmp_path)])
    assert rc == 1
    data, md = read_results(str(tmp_path), "kernels")
    rows = data["rows"]
    ours = next(r for r in rows if r["bench"] == "ok" and r["provider"] == common.OURS)
    assert ours["speedup_vs"] == {"eager": 3.0}
    failed = {r["bench"]: r["error"] for r in common.kernel_failures(rows)}
    assert set(failed) == {"boom", "nothere"}  # the missing peer (apex) is not a failure
    assert "RuntimeError: kernel launch failed" in failed["boom"] and "not found" in failed["nothere"]
    assert "kernel launch failed" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(os.path.join(tmp_path, "kernels.png")) > 0


def test_kernel_script_exits_nonzero_when_ours_fails(tmp_path):
    def run(quick=False, setr_only=False):
        base = dict(kernel="toy", mode="fwd", shape=[4], dtype="float32")
        return [dict(base, provider=common.OURS, ms=None, error="RuntimeError: launch failed"),
                dict(base, provider="eager", ms=1.0)]

    assert common.kernel_bench_main("toy", run, ["kernel", "provider", "ms", "error"], None, "toy",
                                    ["--out", str(tmp_path)]) == 1
    data, md = read_results(str(tmp_path), "toy")
    assert "launch failed" in md


@cpu_only
def test_cpu_figures_say_so_on_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    common.save_figure(fig, str(tmp_path / "f.png"))
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "CPU RUN" in texts and common.cpu_warning() in texts
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- README tables --------------------------------------------------------------------------

GPU_ENV = dict(date="2026-01-01T00:00:00+00:00", torch="2.11.0", triton="3.6.0", python="3.11",
               git_commit="0123456789abcdef", gpu="NVIDIA H100 80GB HBM3", driver="570.1")


def _write(path, env, rows):
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f)


def test_readme_tables_quote_only_the_files(tmp_path):
    base = dict(kernel="setr_pup_vit_large", backbone="vit_large", shape="8x3x512x512", dtype="bf16")
    _write(tmp_path / "train_step_pup.json", GPU_ENV, [
        dict(base, mode="train", provider="eager", batch=8, ms=800.0, images_per_s=10.0, peak_mem_gib=40.5),
        dict(base, mode="train", provider="triton", batch=8, ms=400.0, images_per_s=20.0, peak_mem_gib=15.25),
        dict(base, mode="inference", provider="eager", batch=1, ms=50.0, fps=20.0),
        dict(base, mode="inference", provider="triton", batch=1, ms=25.0, fps=40.0),
        dict(base, mode="train", provider="sdpa", batch=8, error="OOM at batch 8"),
    ])
    _write(tmp_path / "memory_sweep_pup.json", GPU_ENV, [
        dict(base, mode="batch_sweep", provider="eager", batch=2, peak_gib=12.75),
        dict(base, mode="batch_sweep", provider="triton", batch=2, peak_gib=6.5),
    ])
    _write(tmp_path / "kernels.json", GPU_ENV, [
        dict(kernel="attention", mode="fwd", provider="triton", shape="B=8 H=16 N=1025 D=64", dtype="bfloat16",
             ms=0.5, tflops=420.0, speedup_vs={"sdpa_flash": 1.2}),
        dict(kernel="attention", mode="fwd", provider="xformers", shape="B=8 H=16 N=1025 D=64",
             dtype="bfloat16", ms=None, error="ModuleNotFoundError: No module named 'xformers'"),
    ])
    text = readme_tables.render(str(tmp_path))
    pup = next(line for line in text.splitlines() if line.startswith("| SETR-PUP"))
    assert pup == "| SETR-PUP ViT-L/16 | 8 | 15.25 | 40.50 | 6.50 | 12.75 | 20.0 | 10.0 | 40.0 | 20.0 |"
    assert "| attention | fwd | B=8 H=16 N=1025 D=64 | bfloat16 | 0.5 | 420.0 | - | sdpa_flash 1.20x |" in text
    assert "xformers (ModuleNotFoundError" in text
    assert "NVIDIA H100 80GB HBM3" in text and "commit 0123456789" in text
    assert "no results file" in text and "train_step_naive.json" in text  # naive / mla: no numbers
    assert not any(line.startswith("| SETR-Naive") for line in text.splitlines())


def test_readme_tables_refuse_cpu_results(tmp_path):
    row = dict(kernel="setr_pup_vit_tiny", backbone="vit_tiny", mode="train", provider="triton", batch=1, ms=9.0)
    _write(tmp_path / "train_step_pup.json", dict(GPU_ENV, gpu=None), [row])
    with pytest.raises(SystemExit, match="CPU run"):
        readme_tables.render(str(tmp_path))
    text = readme_tables.render(str(tmp_path), allow_cpu=True)  # for tests: renders anyway
    assert "| SETR-PUP ViT-tiny | 1 |" in text
    rc = readme_tables.main(["--results", str(tmp_path), "--allow-cpu", "--out", str(tmp_path / "t.md")])
    assert rc == 0 and (tmp_path / "t.md").read_text() == text


# --- on a GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_train_step_and_memory_quick_on_gpu(tmp_path):
    """The device-only paths: peak memory, MFU, the OOM-catching batch search, the snapshot."""
    rc = train_step.main(["--quick", "--variants", "eager", "triton", "--find-max-batch", "--max-batch", "4",
                          "--out", str(tmp_path)])
    assert rc == 0
    data, md = read_results(str(tmp_path), "train_step_pup")
    known_gpu = peak_flops(data["environment"]["gpu"], "bf16") is not None
    for r in data["rows"]:
        assert "error" not in r and r["peak_mem_gib"] > 0
        if r["mode"] == "train":
            assert r["max_batch"] == 4 and (r["mfu"] is not None) == known_gpu
    assert "- n/a: every goal" not in md
    rc = memory_bench.main(["--quick", "--variants", "eager", "triton", "--snapshot", "--out", str(tmp_path)])
    assert rc == 0
    phases, _ = read_results(str(tmp_path), "memory_pup")
    for r in phases["rows"]:
        assert r["activations_gib"] > 0 and r["peak_gib"] >= r["peak_forward_gib"] > r["weights_gib"]
        assert os.path.getsize(os.path.join(tmp_path, r["snapshot"])) > 0
