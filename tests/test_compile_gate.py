"""The compile gate (bench/compile_gate.py): every kernel launch at SETR's shapes compiles for sm_90a
and sm_80, without spills where the gate forbids them, and the committed table is current.

By default (CI) the committed table's keys must match the current launches (kernel sources,
configs, specializations) and a subset is recompiled and compared; SETR_COMPILE_ALL=1 compiles
everything (about 10 minutes on 2 cores) into a temporary table instead.
"""
import json
import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_gate(args, timeout):
    env = {**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.compile_gate", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"compile gate {args} ran over {timeout} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_compile_gate(tmp_path):
    if os.environ.get("SETR_COMPILE_ALL") == "1":
        rc, out = run_gate(["--all", "--out", str(tmp_path)], timeout=3600)
    else:
        rc, out = run_gate([], timeout=600)
    assert rc == 0, out[-20000:]


def test_stale_table_fails(tmp_path, monkeypatch):
    """The table's check against the current launches (their keys: the committed ones, one more)."""
    for name in ("TRITON_INTERPRET", "TRITON_CACHE_DIR"):  # the gate sets them as it is imported
        monkeypatch.setenv(name, os.environ.get(name, ""))
    from bench import compile_gate

    with open(os.path.join(REPO, "bench", "results", "compile", "compile.json")) as f:
        table = json.load(f)
    current = [dict(key=r["key"]) for r in table["rows"]]
    table["rows"] = table["rows"][1:]  # as if a kernel, config or specialization had changed
    with open(tmp_path / "compile.json", "w") as f:
        json.dump(table, f)
    rows, failures = compile_gate.check_against(current, str(tmp_path / "compile.json"), workers=1)
    assert rows == [] and len(failures) == 1 and "is stale (1 launches changed" in failures[0]
