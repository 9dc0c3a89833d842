"""Benchmarks: kernels, the training step, planned and measured memory, the one-GPU check.

What every bench script shares without importing torch (so that `--help` and a bad flag answer
at once): the name of our implementation, GiB, and how a user's mistake ends a script.
"""
import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

OURS = "triton"  # our Triton kernels (impl="triton"): the provider / variant name of ours everywhere
GIB = 2 ** 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpu_results_dir(gpu):
    """bench/results/<gpu name> (bench/results/cpu for None)."""
    return os.path.join(RESULTS, (gpu or "cpu").replace(" ", "_").replace("/", "_"))


class UsageError(ValueError):
    """A user's mistake (a flag value, a missing or foreign file); the message names it and what
    was expected."""


def choose(flag, value, names):
    """The names a flag's value stands for ("all": every one); a UsageError for an unknown one."""
    if value == "all":
        return list(names)
    if value not in names:
        raise UsageError(f"--{flag} {value!r}: expected one of {', '.join(names)} or all")
    return [value]


def run_script(main, argv=None):
    """main(argv) as a script's exit status, by setr.cli's policy: a UsageError is one line on
    stderr and status 2, anything else a bug (its traceback, status 1)."""
    from setr.cli import run

    return run(os.path.basename(sys.argv[0]), lambda: main(argv), (UsageError,))


def environment():
    """Where a result comes from, read without importing torch: date, versions, commit, host and
    the GPU as nvidia-smi names it (None without one). bench.common.environment() adds torch's view."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "host": platform.node(),
           "git_commit": _output(["git", "rev-parse", "HEAD"])}
    for package in ("torch", "triton"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    gpu = (_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
           or "").splitlines()
    name, memory_mib, driver = (gpu[0].split(", ") + [None, None])[:3] if gpu else (None, None, None)
    env.update(gpu=name, gpu_memory_gb=round(float(memory_mib) / 1024, 1) if memory_mib else None, driver=driver)
    return env


def _output(cmd):
    """stdout of cmd, stripped (None when it cannot run or fails)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=os.path.dirname(RESULTS))
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
