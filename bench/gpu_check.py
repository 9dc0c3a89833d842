"""One command for a GPU run: the GPU tests and every benchmark, each under its own time limit,
in at most 8 minutes on one H100 / H200.

    python bench/gpu_check.py                       # everything, results in bench/results/<gpu>/
    python bench/gpu_check.py --only train_step_compile_eager --scale 3   # rerun a part, 3x its limit
    python bench/gpu_check.py --dry-run             # list the parts, run each in smoke mode (CPU, CI)

Parts, in order (PARTS below: name, time limit, command):
  pytest_gpu       `pytest -m gpu` at real sizes (JUnit XML beside the log)
  kernels          bench/kernels.py --setr-only: SETR's shapes, ours vs SDPA's backends,
                   F.layer_norm, F.interpolate, torch.compile, xformers where importable
  train_step       bench/train_step.py, SETR-PUP ViT-L 512x512 batch 8 bf16: eager, sdpa, triton
  train_step_compile_eager / _triton
                   the same with torch.compile, one variant per part (each compile gets its own
                   limit), added to the same results file (--append)
  memory_b8 / b16  bench/memory.py --estimate: the planned peak memory of PUP impl=triton next to
                   the measured one (torch.cuda.max_memory_allocated of the real step)
  readme_tables    bench/readme_tables.py over the results of this run

Each part is a subprocess in its own process group, killed with its whole group at its limit. A
part that fails or runs out of time is recorded as such and the next part runs; the exit status
is 1 if any part did not pass. Triton's on-disk cache is shared by all parts, so kernels compiled
by one part (the autotuner's configs too) are not compiled again by the next.

Written to --out (default bench/results/<gpu>/): gpu_check.{json,md} (device, driver, CUDA,
torch, triton, commit, date; per part its command, limit, wall time, status, exit code and the
last lines of its output), rewritten after every part, the logs in gpu_check_logs/, and the
files each part writes (kernels.*, train_step_pup.*, readme_tables.md, ...). A full run first
moves the files of an earlier run in --out to previous/<its date>/ (--only adds to them), so
that no result of two runs is mixed and none is lost.

The budget, for a first run on a fresh machine (nothing cached):
  - pytest_gpu pays for the first compile of every autotune config of our kernels (the attention
    kernels have 23, 1-2 s each); later parts find them in Triton's disk cache, and the
    autotuner's choices too (TRITON_CACHE_AUTOTUNING=1).
  - kernels: SETR's shapes only, as each torch.compile peer compiles once per case.
  - train_step: 2 warm-up + 8 timed steps, 4 + 8 loader-fed ones and the inference timing, per
    variant; impl=triton tunes N = 1025 in its first warm-up step.
  - inductor's whole-model compile of ViT-L + PUP is the largest unknown: one part per compiled
    variant, so that one running out costs only its own numbers.
  - out of memory: batch 8 (and 16 for impl=triton) should fit an 80 GB card; an OOM becomes a row
    "OOM at batch B", and the scripts go on.
This process imports no torch and touches no GPU: the environment comes from a subprocess.
"""
import argparse
import ctypes
import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_LIMIT_S = 470  # the parts, their start-up and kill grace included (+ a few s to read the environment)
KILL_GRACE_S = 3  # SIGTERM, then SIGKILL this much later
SMOKE_LIMIT_S = 120  # per part in --dry-run: a guard against a hang, not a budget
TAIL_LINES = 25

TRAIN = ["bench/train_step.py", "--head", "pup"]
TRAIN_GPU = ["--batch", "8", "--dtype", "bf16", "--steps", "8", "--warmup", "2"]
TRAIN_SMOKE = ["--quick", "--dtype", "fp32"]  # bf16 matmuls crawl on most CPUs
COMPILED = ["--append", "--no-inference"]  # inference would compile the eval graph: twice the time
COMPILED_SMOKE = COMPILED + ["--no-data-wait"]  # the train_step part smoke-tests the data wait
# --overwrite: a full run has moved the earlier run's files aside; a rerun (--only) replaces its own
MEMORY = ["bench/memory.py", "--estimate", "--head", "pup", "--impl", "triton", "--overwrite"]
MEMORY_SMOKE = MEMORY + ["--backbone", "vit_tiny", "--crop", "32", "--num-classes", "8"]

# name, limit (s) on the GPU, GPU arguments, smoke arguments (a `{out}` is the output folder)
PARTS = [
    ("pytest_gpu", 70,
     ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", "--junitxml={out}/pytest_gpu.xml", "tests"],
     ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--collect-only", "tests"]),
    ("kernels", 70, ["bench/kernels.py", "--setr-only", "--out", "{out}"],
     ["bench/kernels.py", "--quick", "--out", "{out}"]),
    ("train_step", 80, TRAIN + TRAIN_GPU + ["--variants", "eager", "sdpa", "triton", "--out", "{out}"],
     TRAIN + TRAIN_SMOKE + ["--variants", "eager", "triton", "--out", "{out}"]),  # sdpa: eager's code path
    ("train_step_compile_eager", 90, TRAIN + TRAIN_GPU + COMPILED + ["--variants", "eager+compile", "--out", "{out}"],
     TRAIN + TRAIN_SMOKE + COMPILED_SMOKE + ["--variants", "eager+compile", "--out", "{out}"]),
    ("train_step_compile_triton", 70, TRAIN + TRAIN_GPU + COMPILED + ["--variants", "triton+compile", "--out", "{out}"],
     TRAIN + TRAIN_SMOKE + COMPILED_SMOKE + ["--variants", "triton+compile", "--out", "{out}"]),
    ("memory_b8", 30, MEMORY + ["--batch", "8", "--out", "{out}"], MEMORY_SMOKE + ["--batch", "2", "--out", "{out}"]),
    ("memory_b16", 30, MEMORY + ["--batch", "16", "--out", "{out}"], MEMORY_SMOKE + ["--batch", "4", "--out", "{out}"]),
    ("readme_tables", 5, ["bench/readme_tables.py", "--results", "{out}", "--out", "{out}/readme_tables.md"],
     ["bench/readme_tables.py", "--results", "{out}", "--out", "{out}/readme_tables.md", "--allow-cpu"]),
]
PART_NAMES = [p[0] for p in PARTS]


def part_env():
    """The parts' environment: this repo first on the path, unbuffered output, the autotuner's choices
    logged and kept on disk (a later part reuses them instead of timing every config again)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_PRINT_AUTOTUNING="1", TRITON_CACHE_AUTOTUNING="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def kill_group(proc):
    """SIGTERM the part's process group, SIGKILL what is left after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if wait is not None:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


def _own_group_dies_with_parent():
    """In the part's process: a process group of its own (killed whole at its limit), and SIGKILL
    when this runner dies, however it dies (prctl PR_SET_PDEATHSIG, Linux)."""
    os.setpgrp()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_part(name, cmd, limit_s, log_path):
    """Run cmd in its own process group with output to log_path; its whole group is killed at
    limit_s, once it exits (workers it left behind) and when this run is stopped. Returns the
    part's record."""
    t0, cpu0 = time.monotonic(), _children_cpu_s()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=part_env(),
                                preexec_fn=_own_group_dies_with_parent)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        finally:  # at its limit, once it exited (workers it left behind), or when this run is stopped
            kill_group(proc)
            proc.wait()
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-TAIL_LINES:]
    return dict(name=name, command=" ".join(cmd), limit_s=limit_s, wall_s=round(time.monotonic() - t0, 1),
                cpu_s=round(_children_cpu_s() - cpu0, 1), status=status, returncode=rc,
                log=os.path.relpath(log_path, REPO), tail=tail,
                summary=[line for line in tail if line.startswith("estimate ") or "measured" in line.lower()])


def _children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def probe_environment(out):
    """Device, versions and the results folder, from a subprocess (this process never starts CUDA)."""
    code = ("import json; from bench import common; "
            "print(json.dumps({'environment': common.environment(), 'results_dir': common.results_dir()}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=part_env(),
                         timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"gpu_check: could not read the environment (torch import failed?):\n{res.stderr[-2000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return info["environment"], out or info["results_dir"]


def part_commands(dry_run, out, only=None, scale=1.0):
    """[(name, limit_s, cmd)] of the parts to run, in order."""
    chosen = []
    for name, limit_s, gpu_args, smoke_args in PARTS:
        if only and name not in only:
            continue
        args = smoke_args if dry_run else gpu_args
        chosen.append((name, SMOKE_LIMIT_S if dry_run else limit_s * scale,
                       [sys.executable] + [a.replace("{out}", out) for a in args]))
    return chosen


def move_earlier_run(out):
    """Move the files of an earlier run in out to out/previous/<date>/; returns that folder (or None)."""
    files = [f for f in os.listdir(out) if f != "previous"]
    if not files:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    try:
        with open(os.path.join(out, "gpu_check.json")) as f:
            stamp = json.load(f)["environment"]["date"].replace(":", "").replace("-", "")[:15]
    except (OSError, ValueError, KeyError):
        pass
    dest = os.path.join(out, "previous", stamp)
    while os.path.exists(dest):
        dest += "_"
    os.makedirs(dest)
    for f in files:
        os.replace(os.path.join(out, f), os.path.join(dest, f))
    return dest


def write_report(out, env, records, dry_run):
    """gpu_check.json and gpu_check.md in out (written whole each time, then renamed)."""
    data = dict(environment=env, dry_run=dry_run, total_limit_s=TOTAL_LIMIT_S, parts=records)
    lines = ["# gpu_check" + (" (dry run: smoke mode, timings mean nothing)" if dry_run else ""), "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "",
             "| part | status | wall s | CPU s | limit s | exit code | log |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['wall_s']} | {r.get('cpu_s', '-')} | {r['limit_s']} | "
              f"{r['returncode']} | `{r['log']}` |" for r in records]
    for r in records:
        lines += ["", f"## {r['name']}: {r['status']}", "", f"`{r['command']}`", ""]
        lines += [f"- {line}" for line in r["summary"]] + ["", "```"] + r["tail"] + ["```"]
    for name, text in (("gpu_check.json", json.dumps(data, indent=1)), ("gpu_check.md", "\n".join(lines) + "\n")):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:  # not setr.files: this parent process never imports torch
            f.write(text)
        os.replace(path + ".tmp", path)


def earlier_records(out):
    """The part records of the report already in out (a rerun with --only keeps the others)."""
    try:
        with open(os.path.join(out, "gpu_check.json")) as f:
            return json.load(f)["parts"]
    except (OSError, ValueError, KeyError):
        return []


def run_all(parts, out, env, dry_run, total_limit_s=TOTAL_LIMIT_S, earlier=()):
    """Run the parts in order; a part's limit is cut to what is left of total_limit_s. Returns this
    run's records; the report also keeps `earlier` records of the parts not rerun, in PARTS order."""
    logs = os.path.join(out, "gpu_check_logs")
    os.makedirs(logs, exist_ok=True)
    start, records = time.monotonic(), []
    rerun = {name for name, _, _ in parts}
    kept = [r for r in earlier if r["name"] not in rerun]
    order = lambda r: PART_NAMES.index(r["name"]) if r["name"] in PART_NAMES else len(PART_NAMES)
    for name, limit_s, cmd in parts:
        left = total_limit_s - (time.monotonic() - start) - KILL_GRACE_S
        if left < 1:
            record = dict(name=name, command=" ".join(cmd), limit_s=limit_s, wall_s=0, status="not run",
                          returncode=None, log="-", tail=[f"no time left of the {total_limit_s} s total"], summary=[])
        else:
            print(f"[gpu_check] {name} (limit {min(limit_s, left):.0f} s) ...", flush=True)
            record = run_part(name, cmd, min(limit_s, left), os.path.join(logs, f"{name}.log"))
        records.append(record)
        print(f"[gpu_check] {name}: {record['status']} in {record['wall_s']} s", flush=True)
        print("\n".join("    " + line for line in record["tail"][-8:]), flush=True)
        write_report(out, env, sorted(kept + records, key=order), dry_run)
    return records


def stop_on_sigterm():
    """SIGTERM or SIGHUP ends this run as Ctrl-C does: the running part's group is killed on the way out."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the parts and their limits, run each in smoke mode")
    p.add_argument("--only", nargs="+", choices=PART_NAMES, default=None, help="run these parts only (in order)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every limit and the total by this (a slower GPU, a rerun of a part that ran out)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    return args


def main(argv=None):
    args = parse_args(argv)
    stop_on_sigterm()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env, out = probe_environment(args.out)
    out = os.path.abspath(out)
    if env.get("gpu") is None and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device. --dry-run runs every part in smoke mode on the CPU.")
    os.makedirs(out, exist_ok=True)
    moved = None if args.only else move_earlier_run(out)
    parts = part_commands(args.dry_run, out, args.only, args.scale)
    print(f"gpu_check {'dry run ' if args.dry_run else ''}on {env.get('gpu') or 'CPU'}, started {started}, "
          f"results in {out}" + (f" (the earlier run's files moved to {moved})" if moved else "")
          + f"; parts (limit on the GPU, total {TOTAL_LIMIT_S} s):")
    for name, limit_s, _, _ in PARTS:
        print(f"  {name:<28} {limit_s:>4} s" + ("" if not args.only or name in args.only else "  (not selected)"))
    records = run_all(parts, out, env, args.dry_run, TOTAL_LIMIT_S * args.scale,
                      earlier_records(out) if args.only else ())
    bad = [r for r in records if r["status"] != "passed"]
    print(f"[gpu_check] {len(records) - len(bad)}/{len(records)} parts passed"
          + "".join(f"\nNOT PASSED: {r['name']} ({r['status']}, log {r['log']})" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
