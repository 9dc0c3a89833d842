"""Jobs for the process tests (training, evaluation, a data worker): started in a session
of their own with a unique marker in their environment, failed (instead of hung) past a timeout,
every process carrying the marker killed, and checked that none is left.

    proc, marker = start(torchrun(2) + args)      # or setr_train(2), python_main(), any command
    wait_for_iterations(work_dir, proc, 3)         # or read_line(proc, timeout=30)
    code, out = finish(proc, marker, timeout=60)  # exit status and output; nothing may be left
"""
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "train", "main.py")
LAUNCH = os.path.join(REPO, "train", "launch.py")
MARKER = "SETR_TEST_JOB"
STARTED = []  # markers of the jobs the running test started


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(nproc=2, *options):
    """Plain torchrun on this node, as the README documents it."""
    return TORCHRUN + ["--standalone", *options, f"--nproc_per_node={nproc}", MAIN]


def setr_train(nproc=2, *options):
    """Our launcher (setr-train)."""
    return [sys.executable, LAUNCH, "--standalone", *options, f"--nproc_per_node={nproc}"]


def python_main():
    return [sys.executable, MAIN]


def job_pids(marker):
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{MARKER}={marker}".encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:  # gone, or a zombie
            pass
    return pids


def kill_all(marker):
    for pid in job_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def assert_nothing_left(marker, grace=10.0):
    deadline = time.time() + grace
    while job_pids(marker) and time.time() < deadline:
        time.sleep(0.2)
    left = job_pids(marker)
    if left:
        names = []
        for pid in left:
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
                names.append(f"{pid}: {cmdline[:120].decode(errors='replace')}")
            except OSError:
                pass
        kill_all(marker)
        pytest.fail(f"processes of the job still alive {grace:.0f}s after it ended: {names}")


@pytest.fixture(autouse=True)
def kill_leftovers():
    """A test that fails before finish() (an assert while its job runs) leaves nothing behind either.
    Test modules import it to use it."""
    yield
    while STARTED:
        kill_all(STARTED.pop())


def job_env(marker, **extra):
    STARTED.append(marker)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **{MARKER: marker}, **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def start(command, marker=None, **env):
    """Popen of command (its output captured) and its marker; env: extra environment variables."""
    marker = marker or uuid.uuid4().hex
    proc = subprocess.Popen(command, env=job_env(marker, **env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, marker


def _wait(proc, marker, timeout, what):
    """proc.communicate() within the timeout, else the job killed whole and the test failed (what:
    the job's name); nothing may be left either way."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        kill_all(marker)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not end within {timeout}s:\n{(out + (err or ''))[-4000:]}")
    finally:
        assert_nothing_left(marker)


def finish(proc, marker, timeout):
    """(exit status, output) of a started job; fails past the timeout. Nothing may be left."""
    out, _ = _wait(proc, marker, timeout, "the job")
    return proc.returncode, out


def read_line(proc, timeout):
    """The next line of a started job's output; fails past the timeout (the job keeps running:
    finish() ends it)."""
    if not select.select([proc.stdout], [], [], timeout)[0]:
        pytest.fail(f"no output from the job within {timeout}s")
    return proc.stdout.readline()


def run(command, timeout, cwd=REPO, **env):
    """(exit status, stdout, stderr) of any command run to its end in a session of its own, with
    the jobs' environment (env: extra variables); fails past the timeout; nothing may be left."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(command, env=job_env(marker, **env), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = _wait(proc, marker, timeout, " ".join(map(str, command))[:200])
    return proc.returncode, out, err


def run_job(command, timeout=60):
    """(exit status, output, seconds) of a job run to its end."""
    begin = time.time()
    proc, marker = start(command)
    code, out = finish(proc, marker, timeout)
    return code, out, time.time() - begin


def wait_for_iterations(work_dir, proc, n, timeout=60, poll=0.1):
    metrics = os.path.join(work_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as f:
                if sum('"train"' in line for line in f) >= n:
                    return
        time.sleep(poll)
    raise AssertionError(f"{n} iterations not logged within {timeout}s (exit status {proc.poll()})")


def train_records(work_dir):
    with open(os.path.join(work_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == "train"]


def train_losses(work_dir):
    """{iteration: loss}; an iteration logged twice (run again after a resume): the later record."""
    return {r["iter"]: r["loss"] for r in train_records(work_dir)}


def children(parent):
    """{pid: environment (bytes entries)} of the processes whose parent is `parent`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                found[int(pid)] = f.read().split(b"\0")
        except OSError:
            continue
    return found


def rank_pid(launcher, rank):
    """pid of the launcher's child with RANK=rank (a rank, not one of its data workers)."""
    for pid, env in children(launcher).items():
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under the launcher {launcher}")
