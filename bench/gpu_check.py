"""One command for a GPU run: the training command, the train step, the memory plan, the GPU tests
that fit and a memory check of every kernel, each under its own time limit, in at most 8 minutes.

    python bench/gpu_check.py                       # the default parts, results in bench/results/<gpu>/
    python bench/gpu_check.py --only sanitizer --scale 2   # rerun a part, twice its limit
    python bench/gpu_check.py --only train_step_cityscapes kernels readme_tables   # the extra parts
    python bench/gpu_check.py --dry-run             # every part in smoke mode on the CPU (CI)

PARTS lists the parts, most valuable first (a run cut short loses the last ones), with the
arithmetic of each limit. The training runs (`torchrun --nproc_per_node=1 train/main.py --preset
pup`, impl triton, then eager) put img/s, MFU, max allocated memory and data wait (the means of
their metrics.jsonl records after the first) in train_run.json. The sanitizer runs memcheck, then
racecheck, over `bench/kernels.py --once` (without compute-sanitizer: the kernels bare, and a
note). The EXTRA parts (the Cityscapes train step, the kernel benchmarks) run only when --only
names them: another call of up to 8 minutes. Not run: torch.compile of training (`python
bench/train_step.py --compile both`: three inductor compiles of a ViT-L block) and the full
`python -m pytest -m gpu tests` (each attention dtype, head dim and token bucket autotunes anew:
over 12 minutes of compiles on a cold cache).

Each part is a subprocess in its own process group, killed whole at its limit; a failed or
timed-out part is recorded and the next one runs (exit status 1 if one did not pass). The parts
share Triton's disk cache and autotuning choices. Written to --out (default bench/results/<gpu>/)
after every part: gpu_check.{json,md} (per part its command, limit, wall time, status, exit code,
last lines of output), gpu_check_logs/, each part's files; a full run first moves an earlier
run's files to previous/<date>/ (--only adds to them). --dry-run runs two parts at a time (a part
reading the others' files waits for them). This process imports no torch.
"""
import argparse
import concurrent.futures
import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import REPO, UsageError, environment, gpu_results_dir, new_results_dir, run_script, writable_dir
from setr.files import write_atomic

TOTAL_LIMIT_S = 470  # the parts, their start-up and kill grace included
KILL_GRACE_S = 3  # SIGTERM, then SIGKILL this much later
SMOKE_LIMIT_S = 120  # per part in --dry-run: a guard against a hang, not a budget
TAIL_LINES = 25
SUMMARY_LINES = ("estimate ", "measured ", "- PASS", "- MISS", "Not run here")  # the lines the report lists
RUNNING = set()  # the parts' processes now running (killed with their groups when this run stops)
SANITIZER_DIRS = ["/usr/local/cuda/bin", *sorted(glob.glob("/usr/local/cuda-*/bin"), reverse=True), "/opt/cuda/bin"]

# The training command: {impl} and {out} are filled in; the smoke run is the same command, tiny.
TRAIN_RUN = ["{torchrun}", "--standalone", "--nproc_per_node=1", "train/main.py", "--preset", "pup", "--impl", "{impl}",
             "--dataset", "synthetic", "--eval-interval", "0", "--eval.at_end", "false", "--checkpoint.export", "false",
             "--metrics.tensorboard", "false", "--metrics.progress_bar", "off", "--overwrite",
             "--work-dir", "{out}/train_run/{impl}"]
TRAIN_RUN_GPU = ["--data.synthetic_size", "512,512", "--max-iters", "20", "--log-interval", "5"]
TRAIN_RUN_SMOKE = ["--device", "cpu", "--backbone", "vit_tiny", "--crop-size", "32", "--data.synthetic_size", "32,32",
                   "--batch-size", "2", "--max-iters", "2", "--log-interval", "1", "--num-workers", "0",
                   "--precision", "fp32"]
STEP = ["{python}", "bench/train_step.py", "--out", "{out}"]
STEP_GPU = ["--batch", "8", "--steps", "8", "--warmup", "2"]
MEMORY = ["{python}", "bench/memory.py", "--head", "pup", "--impl", "triton", "--out", "{out}/memory"]
ONCE = ["{python}", "bench/kernels.py", "--once"]
PYTEST = ["{python}", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
# The GPU tests that fit pytest_gpu's limit: each attention dtype, head dim and token bucket autotunes
# 9+6+6 configs anew (up to 90 s of compiles): of attention only N=1025 bf16 (dtype0: the training run
# tuned it); no fp16 LayerNorm (dtype2), nor tests/test_bench's (fp32 attention for ViT-tiny).
GPU_TESTS = ["-k", "setr_shapes[1025-dtype0] or packed_setr_block or (real_sizes and not dtype2) or fused_loss "
             "or on_cuda"]
TABLES = ["{python}", "bench/readme_tables.py", "--results", "{out}", "--out", "{out}/readme_tables.md"]

# name, limit (s) on the GPU, GPU command, smoke command. Limits for a first H100 run (empty Triton
# cache; Triton 3.6 compiles autotune configs one after another) from the compile table's sm_90a
# seconds (bench/results/compile/) and step times (PUP ViT-L 512x512: 2.95 TFLOP per image, 0.12 s a
# batch of 16 at 40% of 989 TFLOP/s, 0.4 s budgeted). start: imports, ViT-L built, CUDA/NCCL init.
#   train_run_triton 165 = 15 start + 113 compiles before step 1 (attention bf16 N=1025, 22 configs: 90;
#     LayerNorm 4; PUP's upsamples and loss 19) + 10 autotuning + 20 steps x 0.4 + 5 checkpoint = 151
#   train_run_eager 45 = 15 start + 20 steps x 0.5 (attention scores materialized) + 5 checkpoint = 30
#   train_step 60 = 10 start + 3 impls x (5 build + 10 steps x 0.3, batch 8) + 4 LayerNorm compiles = 38
#   memory 20 = 5 plan (ViT-L, CPU) + 10 start + 2 steps at batch 16 (kernels cached) = 16
#   pytest_gpu 75 = 10 start + 3 attention (cached) + 25 LayerNorm fp32/bf16 (12 compiles) + 25 upsample,
#     loss fp32/bf16 (~20 compiles) + 5 NCCL, ViT-tiny = 68
#   sanitizer 75 = memcheck: 15 start + 22 attention configs autotuned at N=197 (a new bucket) x 1 s
#     instrumented + 12 other kernels; racecheck (autotuning cached): 15 start + 10 = 74
#   readme_tables 5; total 445 + 7 x 3 s kill grace = 466 <= TOTAL_LIMIT_S. EXTRA, another call:
#   train_step_cityscapes 60 = 10 start + 5 build + 8 autotuning of N=2305 (N=1025's binaries: neither
#     is a multiple of 16) + 16 compiles (19-class upsamples and loss at 768) + 10 steps x 1.0 = 49
#   kernels 240 = 10 start + 32 (108 timings x 0.3) + 9 torch.compile peers x 15 + 8 autotuning = 185
PARTS = [
    ("train_run_triton", 165, TRAIN_RUN + TRAIN_RUN_GPU, TRAIN_RUN + TRAIN_RUN_SMOKE),
    ("train_run_eager", 45, TRAIN_RUN + TRAIN_RUN_GPU, TRAIN_RUN + TRAIN_RUN_SMOKE),
    ("train_step", 60, STEP + STEP_GPU + ["--head", "pup"],
     STEP + ["--head", "pup", "--quick", "--impl", "eager", "triton"]),
    ("memory", 20, MEMORY + ["--measure", "--batch", "16"],  # CPU: the measured step is tests/test_memory_plan.py's
     MEMORY + ["--batch", "2", "--backbone", "vit_tiny", "--crop", "32", "--num-classes", "8"]),
    ("pytest_gpu", 75, PYTEST + GPU_TESTS + ["-rfE", "--junitxml={out}/pytest_gpu.xml", "tests"],
     PYTEST + GPU_TESTS + ["--collect-only", "tests"]),  # CPU: the selection collects (pytest exits 5 on none)
    ("sanitizer", 75, ["{sanitizer}"], ONCE),
    ("train_step_cityscapes", 60, STEP + STEP_GPU + ["--preset", "pup_cityscapes", "--impl", "triton"],
     STEP + ["--preset", "pup_cityscapes", "--quick", "--impl", "triton"]),
    ("kernels", 240, ["{python}", "bench/kernels.py", "--setr-only", "--out", "{out}"],
     ["{python}", "bench/kernels.py", "--quick", "--out", "{out}"]),
    ("readme_tables", 5, TABLES, TABLES + ["--allow-cpu"]),
]
EXTRA = ("train_step_cityscapes", "kernels")  # only when --only names them (every part runs in --dry-run)
WAITS = ("readme_tables",)  # reads the other parts' files: in --dry-run it starts once they all ended
PART_NAMES = [p[0] for p in PARTS]


def find_sanitizer():
    """compute-sanitizer on PATH, in $CUDA_HOME/bin or a CUDA toolkit folder; None when missing."""
    dirs = [os.path.join(os.environ[k], "bin") for k in ("CUDA_HOME", "CUDA_PATH") if k in os.environ] + SANITIZER_DIRS
    return shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path=os.pathsep.join(dirs))


def sanitizer_command(tool):
    """memcheck then racecheck over every kernel (`bench/kernels.py --once`), or the kernels bare
    when compute-sanitizer is missing. Returns (command, note). PyTorch's caching allocator is off
    under the tool: a small tensor would share a 2 MB block with others, hiding an access past it."""
    if tool is None:
        return ONCE, (f"compute-sanitizer NOT FOUND (PATH, $CUDA_HOME/bin, {', '.join(SANITIZER_DIRS)}): the kernels "
                      "ran once without it; install the CUDA toolkit for the memory check")
    once = " ".join(ONCE)
    checks = [f"{tool} --tool {t} --error-exitcode 1 {once}" for t in ("memcheck", "racecheck")]
    return (["bash", "-c", "export PYTORCH_NO_CUDA_MEMORY_CACHING=1; " + " && ".join(checks)],
            f"compute-sanitizer {tool}: memcheck, then racecheck")


def part_commands(dry_run, out, only=None, scale=1.0):
    """[(name, limit_s, cmd, note)] of the parts to run, in order."""
    chosen = []
    for name, limit_s, gpu_args, smoke_args in PARTS:
        if (name not in only) if only else (name in EXTRA and not dry_run):
            continue
        args, note = (smoke_args if dry_run else gpu_args), None
        if args == ["{sanitizer}"]:
            args, note = sanitizer_command(find_sanitizer())
        if dry_run and name == "sanitizer":
            note = "dry run: the kernels once, without compute-sanitizer"
        fill = dict(python=sys.executable, torchrun=f"{sys.executable} -m torch.distributed.run", out=out,
                    impl=name.rsplit("_", 1)[-1])
        cmd = [w for a in args for w in (a.format(**fill).split() if a == "{torchrun}" else [a.format(**fill)])]
        chosen.append((name, SMOKE_LIMIT_S if dry_run else limit_s * scale, cmd, note))
    return chosen


def part_env(side_by_side):
    """This repo first on the path, unbuffered output, the autotuner's choices logged and kept on disk
    (a later part reuses them), one CPU thread each for parts side by side (more only spin)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_PRINT_AUTOTUNING="1", TRITON_CACHE_AUTOTUNING="1")
    if side_by_side:
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def kill_group(proc):
    """SIGTERM the part's process group, SIGKILL what is left after KILL_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)
        os.killpg(proc.pid, signal.SIGKILL)


def _own_group_dies_with_parent():
    """In the part's process: its own process group (killed whole), SIGKILL when this runner dies (Linux prctl)."""
    os.setpgrp()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_part(name, cmd, limit_s, log_path, note=None, side_by_side=False):
    """Run cmd in its own process group, output to log_path; the group is killed at limit_s, once cmd
    exits (workers it left) and when this run is stopped. Returns the part's record."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        print(f"$ {' '.join(cmd)}", file=log, flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=part_env(side_by_side),
                                preexec_fn=_own_group_dies_with_parent)
        RUNNING.add(proc)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        finally:  # at its limit, once it exited (workers it left behind), or when this run is stopped
            kill_group(proc)
            proc.wait()
            RUNNING.discard(proc)
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-TAIL_LINES:]
    summary = [note] if note else []
    summary += [line for line in tail if line.startswith(SUMMARY_LINES)]
    return dict(name=name, command=" ".join(cmd), limit_s=limit_s, wall_s=round(time.monotonic() - t0, 1),
                status=status, returncode=rc, log=os.path.relpath(log_path, REPO), tail=tail, summary=summary)


def add_training_run(out, env, record):
    """A training run's metrics.jsonl summed up (the mean img/s, MFU and data wait, and the max
    allocated memory, of its train records after the first, which holds compiling and autotuning)
    as a row of out/train_run.json, and a line of its record."""
    work_dir = os.path.join(out, "train_run", record["name"].rsplit("_", 1)[-1])
    row = dict(name=record["name"], work_dir=work_dir)
    try:
        with open(os.path.join(work_dir, "metrics.jsonl")) as f:
            steady = [r for r in map(json.loads, f) if r.get("event") == "train"][1:]
        with open(os.path.join(work_dir, "config.json")) as f:
            cfg = json.load(f)
        mean = lambda k: (None if not steady or None in [r[k] for r in steady]
                          else sum(r[k] for r in steady) / len(steady))
        row.update(impl=cfg["model"]["impl"], recompute=cfg["parallel"].get("recompute"),
                   batch=cfg["schedule"]["batch_size"], iters=steady[-1]["iter"], img_per_s=mean("img_per_s"),
                   mfu=mean("mfu"), data_wait=mean("data_wait"), max_mem_gib=max(r["max_mem_gib"] for r in steady))
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        record["summary"].append(f"{row['impl']}: {row['img_per_s']:.1f} img/s, MFU {mfu}, max allocated "
                                 f"{row['max_mem_gib']:.2f} GiB, data wait {100 * row['data_wait']:.0f}%")
    except (OSError, ValueError, KeyError, IndexError) as e:
        row["error"] = f"no metrics: {type(e).__name__}: {e}"
    path = os.path.join(out, "train_run.json")
    rows = [r for r in _read(path, "rows") if r["name"] != row["name"]]
    write_atomic(path, json.dumps({"environment": env, "rows": rows + [row]}, indent=1))


def _read(path, key):
    """json[key] of the file at path; [] when there is none (or it is not ours)."""
    try:
        with open(path) as f:
            return json.load(f)[key]
    except (OSError, ValueError, KeyError):
        return []


def move_earlier_run(out):
    """Move the files of an earlier run in out to out/previous/<now>/; returns that folder (or None)."""
    files = [f for f in os.listdir(out) if f != "previous"]
    if not files:
        return None
    dest = new_results_dir("previous", out)
    os.makedirs(dest)
    for f in files:
        os.replace(os.path.join(out, f), os.path.join(dest, f))
    return dest


def write_report(out, env, records, dry_run):
    """gpu_check.json and gpu_check.md in out (written whole each time, then renamed)."""
    data = dict(environment=env, dry_run=dry_run, total_limit_s=TOTAL_LIMIT_S, parts=records)
    lines = ["# gpu_check" + (" (dry run: smoke mode, timings mean nothing)" if dry_run else ""), "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "",
             "| part | status | wall s | limit s | exit code | log |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['wall_s']} | {r['limit_s']} | {r['returncode']} | `{r['log']}` |"
              for r in records]
    for r in records:
        lines += ["", f"## {r['name']}: {r['status']}", "", f"`{r['command']}`", ""]
        lines += [f"- {line}" for line in r["summary"]] + ["", "```"] + r["tail"] + ["```"]
    write_atomic(os.path.join(out, "gpu_check.json"), json.dumps(data, indent=1))
    write_atomic(os.path.join(out, "gpu_check.md"), "\n".join(lines) + "\n")


def run_all(parts, out, env, dry_run, total_limit_s=TOTAL_LIMIT_S, earlier=(), jobs=1):
    """Run the parts in order, `jobs` at a time (a part in WAITS starts once every part before it
    ended); a part's limit is cut to what is left of total_limit_s. Returns this run's
    records; the report also keeps `earlier` records of the parts not rerun, in PARTS order."""
    logs = os.path.join(out, "gpu_check_logs")
    os.makedirs(logs, exist_ok=True)
    start, records, running = time.monotonic(), {}, {}
    kept = [r for r in earlier if r["name"] not in {p[0] for p in parts}]
    order = lambda r: PART_NAMES.index(r["name"]) if r["name"] in PART_NAMES else len(PART_NAMES)

    def finished(name, record):
        records[name] = record
        if name.startswith("train_run_") and name in PART_NAMES:
            add_training_run(out, env, record)
        print(f"[gpu_check] {name}: {record['status']} in {record['wall_s']} s", flush=True)
        print("\n".join("    " + line for line in record["summary"] + record["tail"][-8:]), flush=True)
        write_report(out, env, sorted(kept + list(records.values()), key=order), dry_run)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        try:
            for name, limit_s, cmd, note in parts:
                if name in WAITS or len(running) >= jobs:
                    when = "ALL_COMPLETED" if name in WAITS else "FIRST_COMPLETED"
                    concurrent.futures.wait(running, return_when=when)
                for future in [f for f in running if f.done()]:
                    finished(running.pop(future), future.result())
                left = total_limit_s - (time.monotonic() - start) - KILL_GRACE_S
                if left < 1:
                    finished(name, dict(name=name, command=" ".join(cmd), limit_s=limit_s, wall_s=0, status="not run",
                                        returncode=None, log="-", tail=[f"no time left of the {total_limit_s} s total"],
                                        summary=[]))
                    continue
                print(f"[gpu_check] {name} (limit {min(limit_s, left):.0f} s) ...", flush=True)
                running[pool.submit(run_part, name, cmd, min(limit_s, left), os.path.join(logs, f"{name}.log"),
                                    note, jobs > 1)] = name
            for future in concurrent.futures.as_completed(list(running)):
                finished(running.pop(future), future.result())
        except BaseException:  # stopped (SIGTERM, Ctrl-C): the running parts go with it
            for proc in list(RUNNING):
                kill_group(proc)
            raise
    return [records[p[0]] for p in parts]


def stop_on_sigterm():
    """SIGTERM or SIGHUP ends this run as Ctrl-C does: the running part's group is killed on the way out."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the parts and their limits, run each in smoke mode")
    p.add_argument("--only", nargs="+", choices=PART_NAMES, default=None, help="run these parts only (in order)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every limit and the total (a slower GPU)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    return args


def main(argv=None):
    args = parse_args(argv)
    stop_on_sigterm()
    env = environment()
    if env["gpu"] is None and not args.dry_run:
        raise UsageError("no GPU (nvidia-smi finds none); --dry-run runs every part in smoke mode on the CPU")
    if args.dry_run:
        env["gpu"] = None  # the parts run on the CPU whatever this machine has
    out = writable_dir(os.path.abspath(args.out or gpu_results_dir(env["gpu"])))
    moved = None if args.only else move_earlier_run(out)
    parts = part_commands(args.dry_run, out, args.only, args.scale)
    print(f"gpu_check {'dry run ' if args.dry_run else ''}on {env['gpu'] or 'CPU'}, started {env['date']}, results in "
          f"{out}" + (f" (the earlier run's files moved to {moved})" if moved else "")
          + f"; parts (limit on the GPU, total {TOTAL_LIMIT_S} s):")
    chosen = {p[0] for p in parts}
    for name, limit_s, *_ in PARTS:
        print(f"  {name:<28} {limit_s:>4} s" + ("" if name in chosen else "  (not selected)"))
    records = run_all(parts, out, env, args.dry_run, TOTAL_LIMIT_S * args.scale,
                      _read(os.path.join(out, "gpu_check.json"), "parts") if args.only else (),  # --only: keep the rest
                      jobs=2 if args.dry_run else 1)
    bad = [r for r in records if r["status"] != "passed"]
    print(f"[gpu_check] {len(records) - len(bad)}/{len(records)} parts passed"
          + "".join(f"\nNOT PASSED: {r['name']} ({r['status']}, log {r['log']})" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
