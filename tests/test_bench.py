"""The benchmark harness: each script's main() on the tiny CPU config, its files, and its logic.

Timings here mean nothing; what is checked is that every script runs end to end, writes the JSON
and markdown with the environment and the CPU warning, reports failures instead of hiding them,
and that the goal, batch-search and README-table logic is right.
"""
import json
import math
import os
import sys
import types

import pytest
import torch

from bench import common, readme_tables, train_step
from bench import kernels as kernels_bench
from bench import memory as memory_bench
from train.trainer import peak_flops

ON_CPU = not torch.cuda.is_available()
TINY = ["--batch", "1", "--img-size", "32", "--num-classes", "8"]
# CPU-path assertions (no device memory, no MFU); the GPU paths: test_train_step_and_memory_quick_on_gpu
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


def check_ours(row, peer_rows):
    """A row of ours ran and was compared with every peer that ran."""
    assert "error" not in row, row.get("error")
    assert set(row["speedup_vs"]) == {p["provider"] for p in peer_rows if p.get("ms")}


# --- train_step ---------------------------------------------------------------------------

VARIANTS = ["eager", "triton", "eager+compile"]


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train_step"))
    rc = train_step.main(["--head", "pup", "--variants", *VARIANTS, "--steps", "1", "--warmup", "0",
                          *TINY, "--out", out])
    return rc, out


@cpu_only
def test_train_step_cpu_smoke(train_results, capsys):
    rc, out = train_results
    data, md = read_results(out, "train_step_pup")
    rows = {(r["provider"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(v, m) for v in VARIANTS for m in ("train", "inference")}
    for v in VARIANTS:
        t, i = rows[v, "train"], rows[v, "inference"]
        assert t["shape"] == "1x3x32x32" and i["shape"] == "1x3x32x32"
        if v.startswith("triton"):
            check_ours(t, [rows[p, "train"] for p in VARIANTS if p != v])
        assert "error" not in t and "error" not in i, (t.get("error"), i.get("error"))
        assert t["ms"] > 0 and i["ms"] > 0
        assert t["images_per_s"] == pytest.approx(1e3 / t["ms"])
        assert i["fps"] == pytest.approx(1e3 / i["ms"])
        assert t["tflops"] == pytest.approx(3 * flops_tiny(v) * t["images_per_s"] / 1e12)
        assert t["mfu"] is None and t["peak_mem_gib"] is None  # no GPU: no MFU, no device memory
        assert math.isfinite(t["loss"])
        # same weights and batch for every variant: the first-step losses agree (bf16 autocast)
        assert t["first_loss"] == pytest.approx(rows["eager", "train"]["first_loss"], rel=2e-2)
    assert "## Goals" in md and "n/a" in md
    assert rc == 0


def flops_tiny(variant):
    import setr

    model = setr.build_setr("pup", "vit_tiny", num_classes=8, img_size=32, impl=variant.split("+")[0],
                            device="meta")
    return model.forward_flops(32, 32)


@cpu_only
def test_train_step_find_max_batch_cpu(tmp_path):
    rc = train_step.main(["--variants", "eager", "--find-max-batch", "--max-batch", "3", "--steps", "1",
                          "--warmup", "0", *TINY, "--out", str(tmp_path)])
    assert rc == 0
    data, _ = read_results(str(tmp_path), "train_step_pup")
    train = [r for r in data["rows"] if r["mode"] == "train"]
    assert len(train) == 1 and train[0]["max_batch"] == 3 and train[0]["max_batch_capped"]


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


# --- memory ---------------------------------------------------------------------------------

@cpu_only
def test_memory_cpu_smoke(tmp_path, capsys):
    # eager and sdpa: the memory code does not depend on the variant, and the triton variant is
    # already run by the train-step test (through the interpreter it costs ~5 s per step)
    rc = memory_bench.main(["--variants", "eager", "sdpa", "--batches", "1", *TINY,
                            "--snapshot", "--out", str(tmp_path)])
    phases, md = read_results(str(tmp_path), "memory_pup")
    sweep, sweep_md = read_results(str(tmp_path), "memory_sweep_pup")
    assert "n/a" in md and "## Goals" in sweep_md
    assert "no snapshot" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pickle")]  # no snapshot on CPU
    rows = {r["provider"]: r for r in phases["rows"]}
    assert set(rows) == {"eager", "sdpa"}
    import setr

    model = setr.build_setr("pup", "vit_tiny", num_classes=8, img_size=32, device="meta")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["weights_gib"] * 2**30 == param_bytes + buffer_bytes
        assert r["grads_gib"] * 2**30 == param_bytes  # every parameter gets a gradient
        assert r["optimizer_state_gib"] * 2**30 == param_bytes  # one momentum buffer each
        assert r["inputs_gib"] * 2**30 == 1 * 3 * 32 * 32 * 4 + 1 * 32 * 32 * 8
        assert r["peak_forward_gib"] is None and "activations_gib" not in r  # device memory: n/a
    batches = sorted((r["provider"], r["batch"]) for r in sweep["rows"])
    assert batches == [("eager", 1), ("sdpa", 1)]
    assert all("error" not in r and r["peak_gib"] is None for r in sweep["rows"])
    assert rc == 0


# --- kernels --------------------------------------------------------------------------------

def test_kernels_cpu_smoke(tmp_path):
    """Every kernel bench runs without an error in a row of ours, next to at least one peer."""
    rc = kernels_bench.main(["--quick", "--out", str(tmp_path)])
    data, md = read_results(str(tmp_path), "kernels")
    by_bench = {}
    for r in data["rows"]:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == set(kernels_bench.KERNEL_BENCHES)
    for name, rows in by_bench.items():
        errors = [r["error"] for r in kernels_bench.failures(rows)]
        assert not errors, f"bench_{name}.py: {errors}"
        ours = [r for r in rows if r["provider"] == common.OURS]
        assert ours and all(r["ms"] > 0 for r in ours)
        assert any(r.get("speedup_vs") for r in ours)  # compared with a peer in the same run
    assert rc == 0


def test_kernels_harness_reports_failures(tmp_path, monkeypatch):
    def ok_run(quick=False):
        base = dict(kernel="toy", mode="fwd", shape=[4, 4], dtype="float32")
        return [dict(base, provider="ours", ms=1.0), dict(base, provider="torch", ms=3.0),
                dict(base, provider="apex", ms=None, error="ModuleNotFoundError: No module named 'apex'")]

    def boom_run(quick=False):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(sys.modules, "bench.bench_ok", types.SimpleNamespace(run=ok_run))
    monkeypatch.setitem(sys.modules, "bench.bench_boom", types.SimpleNamespace(run=boom_run))
    monkeypatch.setattr(kernels_bench, "KERNEL_BENCHES", ("ok", "boom", "nothere"))
    rc = kernels_bench.main(["--only", "ok", "boom", "nothere", "--out", str(tmp_path)])
    assert rc == 1
    data, md = read_results(str(tmp_path), "kernels")
    rows = data["rows"]
    ours = next(r for r in rows if r["bench"] == "ok" and r["provider"] == "ours")
    assert ours["speedup_vs"] == {"torch": 3.0}
    failed = {r["bench"]: r["error"] for r in kernels_bench.failures(rows)}
    assert set(failed) == {"boom", "nothere"}  # the missing peer (apex) is not a failure
    assert "RuntimeError: kernel launch failed" in failed["boom"] and "not found" in failed["nothere"]
    assert "kernel launch failed" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(os.path.join(tmp_path, "kernels.png")) > 0


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
        dict(kernel="attention", mode="fwd", provider="ours", shape="B=8 H=16 N=1025 D=64", dtype="bfloat16",
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


@cpu_only
def test_readme_tables_refuse_cpu_results(train_results, tmp_path):
    _, out = train_results
    with pytest.raises(SystemExit, match="CPU run"):
        readme_tables.render(out)
    text = readme_tables.render(out, allow_cpu=True)  # the smoke-test files render end to end
    assert "| SETR-PUP ViT-tiny | 1 |" in text
    rc = readme_tables.main(["--results", out, "--allow-cpu", "--out", str(tmp_path / "t.md")])
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
