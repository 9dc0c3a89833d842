"""bench/gpu_check.py: the dry run (every part in smoke mode: the CPU smoke test of the kernel,
train-step and README-table scripts) and the runner's time limits, failures and process groups."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import common, gpu_check, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN_TIMEOUT_S = gpu_check.TOTAL_LIMIT_S + 60


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`gpu_check.py --dry-run` in a subprocess. TRITON_INTERPRET=0: impl=triton runs the kernels'
    references on CPU (the interpreter is the kernel tests' business; here it would only cost time)."""
    out = str(tmp_path_factory.mktemp("gpu_check"))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", out], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=DRY_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # gpu_check kills its running part, then exits
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
    for name, limit_s, _, _ in gpu_check.PARTS:
        assert f"{name:<28} {limit_s:>4} s" in stdout  # the listing: each part with its GPU limit
    for p in parts:
        assert os.path.exists(os.path.join(REPO, p["log"])) and p["tail"], p
        assert p["status"] == "passed", (p["name"], p["tail"])
    assert rc == (0 if all(p["status"] == "passed" for p in parts) else 1)
    assert "collected" in "\n".join(parts[0]["tail"])  # pytest -m gpu collects (CPU: runs nothing)
    with open(os.path.join(out, "gpu_check.md")) as f:
        md = f.read()
    assert "| kernels | passed |" in md and "dry run" in md


def test_dry_run_kernels(dry_run):
    rows = load(dry_run[2], "kernels")["rows"]
    by_bench = {}
    for r in rows:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == {"layer_norm", "attention", "upsample"}
    assert not common.kernel_failures(rows)
    for name, group in by_bench.items():
        ours = [r for r in group if r["provider"] == common.OURS]
        assert ours and all(r["ms"] > 0 for r in ours), name
        assert all("eager" in r["speedup_vs"] and "torch.compile" in r["speedup_vs"] for r in ours), name
    assert os.path.getsize(os.path.join(dry_run[2], "kernels.png")) > 0


def test_dry_run_train_step(dry_run):
    data = load(dry_run[2], "train_step_pup")
    rows = {(r["provider"], r["mode"]): r for r in data["rows"]}
    # the compiled variants were added by their own parts (--append), without inference; the
    # smoke run leaves sdpa out (on the GPU: eager, sdpa, triton)
    variants = [v for v in train_step.VARIANTS if v != "sdpa"]
    assert set(rows) == {(v, "train") for v in variants} | {(v, "inference") for v in ("eager", "triton")}
    eager = rows["eager", "train"]
    for v in variants:
        t = rows[v, "train"]
        assert "error" not in t and "data_wait_error" not in t, t
        assert t["shape"] == "1x3x32x32" and t["ms"] > 0
        assert t["images_per_s"] == pytest.approx(1e3 / t["ms"])
        assert t["tflops"] == pytest.approx(t["flops_per_image"] * t["images_per_s"] / 1e12)
        assert t["mfu"] is None and t["peak_mem_gib"] is None  # no GPU: no MFU, no device memory
        if "compile" not in v:  # the compiled variants' smoke parts skip the data wait
            assert 0 <= t["data_wait_share"] <= 1 and t["loader_ms"] > 0 and "0 workers" in t["loader"]
        # same weights and batch for every variant: the first-step losses agree (fp32)
        assert t["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert set(rows["triton", "train"]["speedup_vs"]) == set(variants) - {"triton"}
    assert rows["eager+compile", "train"]["compile_backend"] == "eager"  # the smoke run's Dynamo-only backend


def test_dry_run_readme_tables(dry_run):
    with open(os.path.join(dry_run[2], "readme_tables.md")) as f:
        text = f.read()
    assert "| SETR-PUP ViT-tiny | 1 |" in text and "| attention |" in text


def test_gpu_limits_fit_eight_minutes():
    total = sum(limit for _, limit, _, _ in gpu_check.PARTS)
    assert total + gpu_check.KILL_GRACE_S * len(gpu_check.PARTS) <= gpu_check.TOTAL_LIMIT_S <= 8 * 60


def running(pid):
    """True while pid exists and is not a zombie (an orphan waits to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_failed_and_timed_out_parts_are_recorded_and_the_next_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    spawner = ("import subprocess, sys, time; "
               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('spawned', flush=True); time.sleep(60)")
    parts = [("fails", 30, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
             ("hangs", 2, [sys.executable, "-c", spawner]),
             ("passes", 30, [sys.executable, "-c", "print('fine')"])]
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


def test_total_limit_cuts_the_last_parts(tmp_path):
    parts = [("sleeps", 30, [sys.executable, "-c", "import time; time.sleep(30)"]),
             ("after", 30, [sys.executable, "-c", "print('never')"])]
    records = gpu_check.run_all(parts, str(tmp_path), {"gpu": None}, dry_run=True, total_limit_s=5)
    assert [r["status"] for r in records] == ["timeout", "not run"]
    assert records[0]["wall_s"] < 10


def test_a_new_run_moves_the_earlier_one_aside(tmp_path):
    assert gpu_check.move_earlier_run(str(tmp_path)) is None
    (tmp_path / "kernels.json").write_text("{}")
    (tmp_path / "gpu_check.json").write_text(json.dumps({"environment": {"date": "2026-01-02T03:04:05+00:00"}}))
    dest = gpu_check.move_earlier_run(str(tmp_path))
    assert dest == str(tmp_path / "previous" / "20260102T030405")
    assert sorted(os.listdir(dest)) == ["gpu_check.json", "kernels.json"]
    assert os.listdir(tmp_path) == ["previous"]


def test_scale_multiplies_the_limits():
    normal = gpu_check.part_commands(False, "/o")
    slow = gpu_check.part_commands(False, "/o", only=["kernels"], scale=2)
    assert slow == [(n, 2 * limit, cmd) for n, limit, cmd in normal if n == "kernels"]
    assert "/o" in slow[0][2] and slow[0][2][1:] == ["bench/kernels.py", "--setr-only", "--out", "/o"]


def test_stopping_the_run_stops_its_part(tmp_path):
    pid_file = tmp_path / "part.pid"
    part = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom bench import gpu_check\ngpu_check.stop_on_sigterm()\n"
                      f"gpu_check.run_all([('hangs', 60, [sys.executable, '-c', {part!r}])], {str(tmp_path)!r}, "
                      "{'gpu': None}, dry_run=True)\n")
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
