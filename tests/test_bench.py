"""The benchmark harness: its logic (goals, batch search, ratios, README tables, failure
reporting), its command lines (fast --help, one-line errors) and the one train step it shares
with training and the planner.

The scripts' end-to-end CPU smoke runs (the training command, kernels, train step, memory plan,
README tables) are the parts of `bench/gpu_check.py --dry-run`, checked in tests/test_gpu_check.py.
Timings here mean nothing.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import bench
import train.step
from bench import OURS, common, memory_plan, readme_tables, run_script, train_step
from bench import kernels as kernels_bench
from train.flops import model_flops_utilization, peak_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ("date", "torch", "triton", "git_commit", "gpu", "python")


def read_results(outdir, name):
    with open(os.path.join(outdir, f"{name}.json")) as f:
        data = json.load(f)
    with open(os.path.join(outdir, f"{name}.md")) as f:
        md = f.read()
    assert all(k in data["environment"] for k in ENV_KEYS), data["environment"]
    return data, md


# --- the one train step ---------------------------------------------------------------------

def test_trainer_benchmark_and_planner_run_the_one_train_step(monkeypatch, tmp_path):
    """train.step.train_step is the step of all three: the trainer and the planner hold that very
    function (the trainer's loop calls it: tests/test_train.py), and a spy in its place sees the
    planner's and the benchmark's paths go through it, on the model as training builds it."""
    from train import trainer

    one = train.step.train_step
    assert trainer.train_step is one and memory_plan.train_step is one
    calls = []

    def spy(state, micro_batches, *args, **kwargs):
        calls.append(type(state.model).__name__)
        return one(state, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train.step, "train_step", spy)  # bench/train_step.py imports it at call time
    monkeypatch.setattr(memory_plan, "train_step", spy)
    memory_plan.plan("pup", "eager", 1, "none", crop=32, backbone="vit_tiny", num_classes=7, aux=False)
    assert len(calls) == 2  # the planner: a step for the momentum buffers, then the one it reports
    assert train_step.main(["--quick", "--impl", "eager", "--out", str(tmp_path)]) == 0
    assert len(calls) == 3 and all(name.startswith("FSDP") for name in calls)  # on the FSDP2 model


# --- train_step -----------------------------------------------------------------------------

def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("Tesla T4", "bf16") is None and peak_flops(None, "bf16") is None
    assert model_flops_utilization(2e12, 100.0, 989e12, num_gpus=2) == pytest.approx(2e14 / (2 * 989e12))
    assert model_flops_utilization(2e12, 100.0, None) is None


def _train_row(variant, ips, recompute="selective", **kw):
    return dict(mode="train", provider=variant, images_per_s=ips, batch=16, recompute=recompute, **kw)


def test_goal_lines_pass_and_miss():
    rows = [_train_row("eager", 10.0), _train_row("eager+compile", 13.0),
            _train_row("triton", 16.0, mfu=0.55, mem_per_image_gib=2.3),
            _train_row("eager", 30.0, recompute="none")]  # another policy: not compared with
    lines = train_step.goal_lines("pup", rows, True, gpu_gib=79.1)
    assert len(lines) == 5 and all(line.startswith("- PASS") for line in lines), lines
    assert "recompute=selective" in lines[0]
    rows[2].update(images_per_s=14.0, mfu=0.45, mem_per_image_gib=2.5)
    rows.append(dict(mode="train", provider="sdpa", recompute="selective", error="boom"))
    lines = train_step.goal_lines("pup", rows, True, gpu_gib=79.1)
    assert [line.split(":")[0] for line in lines] == ["- MISS"] * 4 + ["- PASS"], lines
    assert "1.40x eager" in lines[0] and "1.08x eager+compile" in lines[1]
    # a bigger GPU cannot prove the 80 GB goal; other heads have no memory goal; CPU: no goals
    assert train_step.goal_lines("pup", rows, True, gpu_gib=139.8)[-1].startswith("- n/a")
    assert train_step.goal_lines("mla", rows, True, gpu_gib=79.1)[-1].startswith("- n/a")
    assert train_step.goal_lines("pup", rows, False)[0].startswith("- n/a")
    rows[2]["batch"] = 8  # batch 8: the batch-16 goal is not decided
    assert "rerun with --batch 16" in train_step.goal_lines("pup", rows, True, gpu_gib=79.1)[-1]
    rows[2] = dict(mode="train", provider="triton", recompute="selective", batch=16, error="OOM at batch 16")
    lines = train_step.goal_lines("pup", rows, True, gpu_gib=79.1)
    assert lines[-1] == "- MISS: batch 16 of PUP fits on one 80 GB GPU (impl=triton: OOM at batch 16)"
    assert all(line.startswith("- n/a") for line in lines[:-1])


def test_oom_detection():
    from bench.step import is_oom

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("compiled graph failed") from e
    except RuntimeError as wrapped:
        assert is_oom(wrapped)
    assert not is_oom(ValueError("shape mismatch"))


def test_ratios_compare_ours_with_the_peers_only():
    rows = [dict(provider=p, mode="train", recompute="none", ms=ms)
            for p, ms in (("eager", 4.0), (OURS, 2.0), (OURS + "+compile", 1.0), ("eager+compile", 2.0))]
    common.add_ratios(rows, ours=(OURS, OURS + "+compile"), keys=("mode", "recompute"))
    assert rows[1]["speedup_vs"] == {"eager": 2.0, "eager+compile": 1.0}  # not against triton+compile
    assert rows[2]["speedup_vs"] == {"eager": 4.0, "eager+compile": 2.0} and "speedup_vs" not in rows[0]


# --- kernels ---------------------------------------------------------------------------------

def test_kernels_harness_reports_failures(tmp_path, monkeypatch):
    def ok_run(quick=False, setr_only=False):
        base = dict(kernel="toy", mode="fwd", shape=[4, 4], dtype="float32")
        return [dict(base, provider=OURS, ms=1.0), dict(base, provider="eager", ms=3.0)]

    def boom_run(quick=False, setr_only=False):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(sys.modules, "bench.bench_ok",
                        types.SimpleNamespace(run=ok_run, unavailable=lambda: {"apex": "not installed"}))
    monkeypatch.setitem(sys.modules, "bench.bench_boom", types.SimpleNamespace(run=boom_run, unavailable=dict))
    monkeypatch.setattr(kernels_bench, "KERNEL_BENCHES", ("ok", "boom", "nothere"))
    assert kernels_bench.main(["--only", "ok", "boom", "nothere", "--out", str(tmp_path)]) == 1
    data, md = read_results(str(tmp_path), "kernels")
    ours = next(r for r in data["rows"] if r["bench"] == "ok" and r["provider"] == OURS)
    assert ours["speedup_vs"] == {"eager": 3.0}
    failed = {r["bench"]: r["error"] for r in data["rows"] if r.get("error")}
    assert set(failed) == {"boom", "nothere"} and len(common.failure_lines(data["rows"])) == 2
    assert "RuntimeError: kernel launch failed" in failed["boom"]
    assert "No module named 'bench.bench_nothere'" in failed["nothere"]
    assert data["not_run"] == {"apex": "not installed"} and "Not run here: apex (not installed)." in md
    assert "kernel launch failed" in md


# --- README tables --------------------------------------------------------------------------

GPU_ENV = dict(date="2026-01-01T00:00:00+00:00", torch="2.11.0", triton="3.6.0", python="3.12",
               git_commit="0123456789abcdef", gpu="NVIDIA H100 80GB HBM3", driver="570.1")


def _write(path, env, rows, **extra):
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows, **extra}, f)


def test_readme_tables_quote_only_the_files(tmp_path):
    base = dict(kernel="setr_pup_vit_large", preset="pup", head="pup", backbone="vit_large", shape="8x3x512x512",
                dtype="bf16", recompute="selective", compile=False)
    _write(tmp_path / "train_run.json", GPU_ENV, [
        dict(name="train_run_triton", impl="triton", recompute="selective", batch=16, iters=20, img_per_s=21.5,
             mfu=0.456, max_mem_gib=14.25, data_wait=0.02),
        dict(name="train_run_eager", error="no metrics: [Errno 2] No such file")])
    _write(tmp_path / "train_step_pup.json", GPU_ENV, [
        dict(base, mode="train", provider="eager", impl="eager", batch=8, ms=800.0, images_per_s=10.0,
             mfu=0.2, peak_mem_gib=40.5, mem_per_image_gib=5.0625),
        dict(base, mode="train", provider="triton+compile", impl="triton", compile=True, batch=8, images_per_s=20.0,
             mfu=0.4, peak_mem_gib=15.25, mem_per_image_gib=1.90625),
        dict(base, mode="train", provider="sdpa", impl="sdpa", batch=8, error="OOM at batch 8")])
    _write(tmp_path / "kernels.json", GPU_ENV, [
        dict(kernel="attention", mode="fwd", provider="triton", shape="B=8 H=16 N=1025 D=64", dtype="bfloat16",
             ms=0.5, tflops=420.0, speedup_vs={"sdpa_flash": 1.2})], not_run={"xformers": "not installed"})
    text = readme_tables.render(str(tmp_path), estimate_dir=str(tmp_path / "none"))
    lines = text.splitlines()
    assert "| train_run_triton | triton | selective | 16 | 20 | 21.5 | 45.6% | 14.25 | 2% |" in lines
    assert any(line.startswith("| train_run_eager | error: no metrics") for line in lines)
    assert "| SETR-PUP ViT-L/16 (pup) | eager | selective | off | bf16 | 8 | 10.0 | 20.0% | 40.50 | 5.06 |" in lines
    assert "| SETR-PUP ViT-L/16 (pup) | triton | selective | on | bf16 | 8 | 20.0 | 40.0% | 15.25 | 1.91 |" in lines
    assert "| SETR-PUP ViT-L/16 (pup) | sdpa | selective | off | bf16 | 8 | error: OOM at batch 8 |  |  |  |  |" in lines
    assert "| attention | fwd | B=8 H=16 N=1025 D=64 | bfloat16 | 0.5 | 420.0 | - | sdpa_flash 1.20x |" in lines
    assert "Not measured in this run: xformers (not installed)." in text
    assert "NVIDIA H100 80GB HBM3" in text and "commit 0123456789" in text and "No plans in" in text


def test_planned_table_rows_and_order(tmp_path):
    configs = []

    def plan(impl, recompute, world, peak, preset="pup", table=True):
        config = bench.plan_config(preset, impl, recompute, world)
        row = dict(config, peak_gib=peak, per_image_gib=peak / config["batch"])
        (tmp_path / f"{bench.plan_name(config)}.json").write_text(json.dumps({"environment": GPU_ENV, "row": row}))
        configs.extend([config] if table else [])

    for impl, scale in (("eager", 3.0), ("sdpa", 2.0), ("triton", 1.0)):
        for recompute, peak in (("full", 4.0), ("none", 16.0), ("selective", 8.0)):
            plan(impl, recompute, 8, scale * peak / 8)
    plan("triton", "none", 1, 13.8)
    plan("triton", "none", 8, 0.9, preset="pup_cityscapes")
    plan("triton", "none", 8, 0.5, preset="naive", table=False)  # a plan of no config of the table: left out
    rows = [line for line in readme_tables.planned_table(str(tmp_path), configs).splitlines() if line.startswith("| ")]
    rows = rows[1:]
    assert [r.split(" | ")[3:5] for r in rows] == [["1 x 16", "none"], ["8 x 2", "none"], ["8 x 2", "selective"],
                                                   ["8 x 2", "full"], ["8 x 1", "none"]]  # most memory first
    assert rows[1] == "| ADE20K 512x512 | SETR-PUP | 16 | 8 x 2 | none | 6.00 (3.00) | 4.00 (2.00) | 2.00 (1.00) | " \
                      "19.54 (fp32, 8 x 2) |"
    assert rows[0].endswith("| - | - | 13.80 (0.86) |  |")
    assert rows[4].startswith("| Cityscapes 768x768 | SETR-PUP | 8 | 8 x 1 |") and len(rows) == 5


def test_readme_tables_refuse_cpu_results_and_skip_folders_of_no_gpu(tmp_path, capsys):
    row = dict(kernel="attention", mode="fwd", provider="triton", shape="B=1", dtype="float32", ms=9.0)
    _write(tmp_path / "kernels.json", dict(GPU_ENV, gpu=None), [row])
    assert run_script(readme_tables.main, ["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "comes from a CPU run" in err and err.count("\n") == 1
    text = readme_tables.render(str(tmp_path), allow_cpu=True)  # for tests: renders anyway
    assert "| attention | fwd | B=1 | float32 | 9 |" in text
    for name in ("cpu", "compile", "estimate", "memory", "train_step", "kernels", "NVIDIA_H100"):
        (tmp_path / "results" / name).mkdir(parents=True)
    for name in ("cpu", "NVIDIA_H100"):  # gpu_check's folders: its dry runs' and a GPU's
        (tmp_path / "results" / name / "gpu_check.json").write_text("{}")
    assert readme_tables.gpu_results_dirs(str(tmp_path / "results")) == [str(tmp_path / "results" / "NVIDIA_H100")]


# --- command lines ------------------------------------------------------------------------------

SCRIPTS = ["bench/kernels.py", "bench/train_step.py", "bench/memory.py", "bench/readme_tables.py",
           "bench/gpu_check.py", "bench/bench_data.py", "bench/compile_gate.py"]


def test_every_script_answers_help_without_importing_torch():
    """--help parses before torch is imported, so it answers at once: each script run as a script,
    in one process."""
    code = ("import contextlib, io, runpy, sys\n"
            f"for script in {SCRIPTS!r}:\n"
            "    sys.argv, out = [script, '--help'], io.StringIO()\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    print(script, 'usage:' in out.getvalue(), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == [f"{script} True False" for script in SCRIPTS], out.stderr[-2000:]


@pytest.mark.parametrize("script, argv, message", [
    ("train_step", ["--recompute", "sometimes"], "--recompute 'sometimes': expected one of none"),
    ("train_step", ["--preset", "pup_kitti"], "--preset 'pup_kitti': expected one of naive, pup"),
    ("readme_tables", ["--results", "/nonexistent/results"], "--results /nonexistent/results: no such folder"),
    ("bench_data", ["--data-root", "/nonexistent/ade"], "--data-root /nonexistent/ade --split validation: "),
    # an --out that cannot be written: refused before any work (the kernels: before the first benchmark)
    ("kernels", ["--out", "{file}/out"], "--out {file}/out: cannot write there"),
    ("train_step", ["--quick", "--out", "{file}/out"], "--out {file}/out: cannot write there"),
    ("memory", ["--backbone", "vit_tiny", "--out", "{file}/out"], "--out {file}/out: cannot write there"),
    ("bench_data", ["--out", "{file}/out"], "--out {file}/out: cannot write there"),
    ("readme_tables", ["--out", "{file}/out/tables.md"], "--out {file}/out: cannot write there"),
])
def test_a_mistake_is_one_line_and_exit_status_2(script, argv, message, capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    module = __import__(f"bench.{script}", fromlist=["main"])
    if script == "kernels":
        monkeypatch.setattr(kernels_bench, "run_bench", lambda *a: pytest.fail("a benchmark ran"))
    assert run_script(module.main, [a.format(file=tmp_path / "file") for a in argv]) == 2
    err = capsys.readouterr().err
    message = message.format(file=tmp_path / "file")
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


# --- on a GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_train_step_and_memory_quick_on_gpu(tmp_path):
    """The device-only paths: peak memory, MFU, the measured step and its snapshot."""
    from bench import memory

    rc = train_step.main(["--quick", "--impl", "eager", "triton", "--recompute", "all", "--out", str(tmp_path)])
    assert rc == 0
    data, md = read_results(str(tmp_path), "train_step_pup")
    known_gpu = peak_flops(data["environment"]["gpu"], "fp32") is not None
    for r in data["rows"]:
        assert "error" not in r and r["peak_mem_gib"] > 0 and (r["mfu"] is not None) == known_gpu
    assert "- n/a: every goal" not in md
    assert memory.main(["--backbone", "vit_tiny", "--crop", "32", "--batch", "2", "--num-classes", "8", "--measure",
                        "--snapshot", "--out", str(tmp_path / "memory")]) == 0
    assert any(f.endswith("_snapshot.pickle") for f in os.listdir(tmp_path / "memory"))
