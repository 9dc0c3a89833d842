"""bench/gpu_check.py: the dry run (every part in smoke mode: the CPU smoke test of the training
command and of the kernel, train-step, memory and README-table scripts) and the runner's time
limits, failures, order and process groups."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import OURS, gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN_TIMEOUT_S = gpu_check.TOTAL_LIMIT_S + 60


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`gpu_check.py --dry-run` in a subprocess. TRITON_INTERPRET=0: impl=triton runs the kernels'
    references on CPU (the interpreter is the kernel tests' business; here it would only cost time)."""
    out = str(tmp_path_factory.mktemp("gpu_check"))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", out], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=DRY_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # gpu_check kills its running parts, then exits
        try:
            proc.communicate(timeout=15)
        finally:
            kill_group(proc.pid)
        pytest.fail(f"gpu_check --dry-run took more than {DRY_RUN_TIMEOUT_S} s")
    with open(os.path.join(out, "gpu_check.json")) as f:
        report = json.load(f)
    return proc.returncode, stdout, out, report


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def test_dry_run_lists_and_runs_every_part(dry_run):
    rc, stdout, out, report = dry_run
    parts = report["parts"]
    assert report["dry_run"] and report["environment"]["gpu"] is None
    assert [p["name"] for p in parts] == gpu_check.PART_NAMES
    for name, limit_s, *_ in gpu_check.PARTS:
        assert f"{name:<28} {limit_s:>4} s" in stdout  # the listing: each part with its GPU limit
    for p in parts:
        assert os.path.exists(os.path.join(REPO, p["log"])) and p["tail"], p
        assert p["status"] == "passed", (p["name"], p["tail"])
    assert rc == 0
    by_name = {p["name"]: p for p in parts}
    assert by_name["sanitizer"]["summary"][0].startswith("dry run: the kernels once")
    assert sum("ran attention" in line for line in by_name["sanitizer"]["tail"]) == 1  # bf16
    assert any(line.startswith("estimate pup triton recompute=") for line in by_name["memory"]["summary"])
    with open(os.path.join(out, "gpu_check.md")) as f:
        md = f.read()
    assert "| kernels | passed |" in md and "dry run" in md


def test_dry_run_collects_the_gpu_tests_that_fit(dry_run):
    """pytest_gpu's selection (collected in the dry run): of attention, N=1025 in bf16 only."""
    import test_attention

    with open(os.path.join(REPO, next(p for p in dry_run[3]["parts"] if p["name"] == "pytest_gpu")["log"])) as f:
        collected = [line for line in f.read().splitlines() if "::" in line]
    attention = [line.split("::")[1] for line in collected if line.startswith("tests/test_attention.py")]
    assert attention == ["test_gpu_setr_shapes[1025-dtype0]", "test_gpu_packed_setr_block_deterministic"]
    dtypes = next(m.args[1] for m in test_attention.test_gpu_setr_shapes.pytestmark if m.args[0] == "dtype")
    assert dtypes[0] == torch.bfloat16  # what dtype0 stands for
    assert not any("test_bench.py" in line or "dtype2" in line for line in collected), collected
    assert any("test_upsample_cross_entropy.py" in line for line in collected)


def test_dry_run_training_runs(dry_run):
    """The training command itself ran for each impl, and its metrics.jsonl became a row."""
    rows = {r["name"]: r for r in load(dry_run[2], "train_run")["rows"]}
    assert set(rows) == {"train_run_triton", "train_run_eager"}
    for impl in ("triton", "eager"):
        r = rows[f"train_run_{impl}"]
        assert "error" not in r, r
        assert r["impl"] == impl and r["iters"] == 2 and r["batch"] == 2 and r["img_per_s"] > 0
        assert r["mfu"] is None and 0 <= r["data_wait"] <= 1  # no GPU: no MFU
        assert os.path.exists(os.path.join(r["work_dir"], "metrics.jsonl"))
    summary = {p["name"]: p["summary"] for p in dry_run[3]["parts"]}
    assert any(line.startswith("triton: ") and "img/s" in line for line in summary["train_run_triton"])


def test_dry_run_kernels(dry_run):
    data = load(dry_run[2], "kernels")
    by_bench = {}
    for r in data["rows"]:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == {"layer_norm", "attention", "upsample"}
    assert not any(r.get("error") for r in data["rows"])  # what cannot run on CPU is left out, not an error row
    assert data["not_run"]["sdpa_cudnn"] == "a CUDA-only SDPA backend"
    assert not {r["provider"] for r in data["rows"]} & set(data["not_run"])
    for name, group in by_bench.items():
        ours = [r for r in group if r["provider"] == OURS]
        assert ours and all(r["ms"] > 0 for r in ours), name
        assert all("eager" in r["speedup_vs"] and "torch.compile" in r["speedup_vs"] for r in ours), name


def test_dry_run_train_step(dry_run):
    rows = {r["provider"]: r for r in load(dry_run[2], "train_step_pup")["rows"]}
    # the smoke run leaves sdpa (eager's code path on CPU) and torch.compile (minutes of inductor) out
    assert set(rows) == {"eager", "triton"}
    eager = rows["eager"]
    for impl in ("eager", "triton"):
        t = rows[impl]
        assert "error" not in t, t
        assert t["shape"] == "1x3x32x32" and t["ms"] > 0 and t["recompute"] == eager["recompute"]
        assert t["images_per_s"] == pytest.approx(1e3 / t["ms"])
        assert t["tflops"] == pytest.approx(t["flops_per_image"] * t["images_per_s"] / 1e12)
        assert t["mfu"] is None and t["peak_mem_gib"] is None  # no GPU: no MFU, no device memory
        # same weights and batch for every variant: the first-step losses agree (fp32)
        assert t["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert set(rows["triton"]["speedup_vs"]) == {"eager"}
    cityscapes, = load(dry_run[2], "train_step_pup_cityscapes")["rows"]  # the extra part's one row
    assert cityscapes["provider"] == "triton" and "error" not in cityscapes, cityscapes


def test_dry_run_readme_tables(dry_run):
    with open(os.path.join(dry_run[2], "readme_tables.md")) as f:
        text = f.read()
    assert "| train_run_triton | triton |" in text and "| SETR-PUP ViT-tiny (pup) | triton |" in text
    assert "| attention |" in text and "### Planned memory" in text


def test_gpu_limits_fit_eight_minutes_and_the_extra_parts_another_eight():
    default = gpu_check.part_commands(False, "/o")
    assert [name for name, *_ in default] == [n for n in gpu_check.PART_NAMES if n not in gpu_check.EXTRA]
    extra = gpu_check.part_commands(False, "/o", only=list(gpu_check.EXTRA) + ["readme_tables"])
    for parts in (default, extra):
        total = sum(limit for _, limit, *_ in parts)
        assert total + gpu_check.KILL_GRACE_S * len(parts) <= gpu_check.TOTAL_LIMIT_S <= 8 * 60


def test_sanitizer_found_or_said_missing(tmp_path, monkeypatch):
    tool = tmp_path / "compute-sanitizer"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(gpu_check, "SANITIZER_DIRS", [str(tmp_path)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    (name, _, cmd, note), = gpu_check.part_commands(False, "/o", only=["sanitizer"])
    assert cmd[:2] == ["bash", "-c"] and f"{tool} --tool memcheck" in cmd[2] and "--tool racecheck" in cmd[2]
    assert "bench/kernels.py --once" in cmd[2] and "{" not in cmd[2]
    assert cmd[2].startswith("export PYTORCH_NO_CUDA_MEMORY_CACHING=1; ")  # the allocator hides no access
    tool.unlink()
    (name, _, cmd, note), = gpu_check.part_commands(False, "/o", only=["sanitizer"])
    assert cmd[1:] == ["bench/kernels.py", "--once"] and note.startswith("compute-sanitizer NOT FOUND")


def test_training_run_command():
    (name, limit, cmd, note), = gpu_check.part_commands(False, "/o", only=["train_run_eager"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train/main.py", "--preset",
                       "pup", "--impl", "eager", *cmd[10:]]
    assert cmd[cmd.index("--work-dir") + 1] == "/o/train_run/eager" and "512,512" in cmd


def running(pid):
    """True while pid exists and is not a zombie (an orphan waits to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def part(name, limit, code):
    return (name, limit, [sys.executable, "-c", code], None)


def test_failed_and_timed_out_parts_are_recorded_and_the_next_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    hangs = ("hangs", 1, ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo spawned; sleep 60"], None)
    parts = [part("fails", 30, "import sys; print('boom'); sys.exit(3)"), hangs, part("passes", 30, "print('fine')")]
    t0 = time.monotonic()
    records = gpu_check.run_all(parts, str(tmp_path), {"gpu": None}, dry_run=True, total_limit_s=60)
    assert time.monotonic() - t0 < 20
    status = {r["name"]: (r["status"], r["returncode"]) for r in records}
    assert status["fails"] == ("failed", 3) and status["hangs"] == ("timeout", None)
    assert status["passes"] == ("passed", 0)
    assert records[0]["tail"][-1] == "boom" and "spawned" in records[1]["tail"]
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not running(child)  # the hung part's child went with its process group
    with open(tmp_path / "gpu_check.json") as f:
        assert [p["name"] for p in json.load(f)["parts"]] == [p[0] for p in parts]


def test_two_at_a_time_and_a_waiting_part_waits(tmp_path, monkeypatch):
    stamp = "import time, sys; t = time.time(); time.sleep({}); print(t, time.time())"
    monkeypatch.setattr(gpu_check, "WAITS", ("after",))
    parts = [part("a", 30, stamp.format(0.5)), part("b", 30, stamp.format(0.5)), part("after", 30, stamp.format(0))]
    records = gpu_check.run_all(parts, str(tmp_path), {"gpu": None}, dry_run=True, jobs=2)
    (a0, a1), (b0, b1), (c0, _) = [map(float, r["tail"][-1].split()) for r in records]
    assert b0 < a1 and a0 < b1  # side by side
    assert c0 >= max(a1, b1)  # after both
    assert all(r["status"] == "passed" for r in records)


def test_total_limit_cuts_the_last_parts(tmp_path):
    parts = [("sleeps", 30, ["sleep", "30"], None), part("after", 30, "print('never')")]
    records = gpu_check.run_all(parts, str(tmp_path), {"gpu": None}, dry_run=True, total_limit_s=5)
    assert [r["status"] for r in records] == ["timeout", "not run"]
    assert records[0]["wall_s"] < 10


def test_a_new_run_moves_the_earlier_one_aside(tmp_path):
    assert gpu_check.move_earlier_run(str(tmp_path)) is None
    (tmp_path / "kernels.json").write_text("{}")
    (tmp_path / "gpu_check.json").write_text("{}")
    dest = gpu_check.move_earlier_run(str(tmp_path))
    assert os.path.dirname(dest) == str(tmp_path / "previous")
    assert sorted(os.listdir(dest)) == ["gpu_check.json", "kernels.json"]
    assert os.listdir(tmp_path) == ["previous"]


def test_scale_multiplies_the_limits():
    slow = gpu_check.part_commands(False, "/o", only=["kernels"], scale=2)
    assert [(n, limit) for n, limit, *_ in slow] == [(n, 2 * limit) for n, limit, *_ in gpu_check.PARTS
                                                     if n == "kernels"]
    assert slow[0][2][1:] == ["bench/kernels.py", "--setr-only", "--out", "/o"]


def test_stopping_the_run_stops_its_part(tmp_path):
    pid_file = tmp_path / "part.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom bench import gpu_check\ngpu_check.stop_on_sigterm()\n"
                      f"gpu_check.run_all([('hangs', 60, [sys.executable, '-c', {code!r}], None)], "
                      f"{str(tmp_path)!r}, {{'gpu': None}}, dry_run=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the part never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        time.sleep(0.2)
        assert not running(int(pid_file.read_text()))
    finally:
        kill_group(proc.pid)
