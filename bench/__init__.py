"""Benchmarks: kernels, the training step, planned and measured memory, the one-GPU check.

What the bench scripts share without importing torch (so that `--help` and a bad flag answer at
once): names, where results go, how a user's mistake ends a script, the training configs they run.
"""
import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

from setr.files import first_line

OURS = "triton"  # our Triton kernels (impl="triton"): the provider / variant name of ours everywhere
GIB = 2 ** 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")


def gpu_results_dir(gpu):
    """bench/results/<gpu name> (bench/results/cpu for None): gpu_check's default folder."""
    return os.path.join(RESULTS, (gpu or "cpu").replace(" ", "_").replace("/", "_"))


def new_results_dir(script, root=RESULTS):
    """root/<script>/<date and time, to the microsecond>/: a run's own folder (default under bench/results)."""
    return os.path.join(root, script, datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))


def writable_dir(path, flag="--out"):
    """setr.files.make_writable_dir(path) before any work, a UsageError naming it if it fails; path."""
    from setr.files import make_writable_dir

    try:
        make_writable_dir(path)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


class UsageError(ValueError):
    """A user's mistake (a flag value, a missing or foreign file); the message names it and what was expected."""


def choose(flag, value, names):
    """The names a flag's value stands for ("all": every one); a UsageError for an unknown one."""
    if value == "all":
        return list(names)
    if value not in names:
        raise UsageError(f"--{flag} {value!r}: expected one of {', '.join(names)} or all")
    return [value]


def run_script(main, argv=None):
    """main(argv) as an exit status by setr.cli's policy: a UsageError one line and 2, else a bug (traceback, 1)."""
    from setr.cli import run

    return run(os.path.basename(sys.argv[0]), lambda: main(argv), (UsageError,))


def error_text(exc):
    """An exception in one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {first_line(exc, limit=300)}"


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
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# --- the configs benchmarks run ----------------------------------------------------------------

def run_config(preset, impl, recompute, precision="bf16", compile_=False, backbone="vit_large", crop=None,
               num_classes=None, aux=True):
    """The training config of a preset (train/config.py: "pup" is SETR-PUP's ADE20K recipe, ...)
    with these settings changed (crop and classes: the preset's unless given)."""
    from train.config import get_preset

    cfg = get_preset(preset)
    cfg.model.impl, cfg.model.backbone, cfg.model.aux = impl, backbone, aux
    cfg.model.num_classes = num_classes or cfg.model.num_classes
    cfg.parallel.recompute, cfg.parallel.precision, cfg.parallel.compile = recompute, precision, compile_
    cfg.data.crop_size = (crop, crop) if crop else tuple(cfg.data.crop_size)
    return cfg


def plan_config(preset, impl, recompute, world_size=1, batch=None, precision="bf16", crop=None, num_classes=None,
                backbone="vit_large"):
    """A config of the memory planner (bench/memory.py): run_config's, batch the preset's over the GPUs."""
    from setr.data.catalog import NAMED_DATASETS

    cfg = run_config(preset, impl, recompute, precision, backbone=backbone, crop=crop, num_classes=num_classes)
    return dict(preset=preset, head=cfg.model.head, dataset=NAMED_DATASETS[cfg.data.dataset].title, impl=impl,
                recompute=recompute, world_size=world_size, precision=precision, crop=cfg.data.crop_size[0],
                batch=batch or max(1, cfg.schedule.batch_size // world_size), backbone=backbone,
                num_classes=cfg.model.num_classes)


def plan_name(c):
    """The file name (without .json) of a plan_config's results."""
    return (f"{c['preset']}_{c['backbone']}_{c['crop']}_{c['impl']}_{c['precision']}_recompute-{c['recompute']}"
            f"_b{c['batch']}_w{c['world_size']}")


def setr_crops():
    """(crop, classes) of the training presets of the named datasets, each once, in train/config.py's
    order: ADE20K 512x512 (150 classes), Cityscapes 768x768 (19), Pascal Context 480x480 (60)."""
    from setr.data.catalog import NAMED_DATASETS
    from train.config import PRESETS, get_preset

    presets = [c for c in map(get_preset, PRESETS) if c.data.dataset in NAMED_DATASETS]
    return tuple(dict.fromkeys((c.data.crop_size[0], c.model.num_classes) for c in presets))


def setr_tokens():
    """ViT token counts, class token included, at setr_crops()'s crops: 1025, 2305, 901."""
    from setr.constants import PATCH_SIZE

    return [(crop // PATCH_SIZE) ** 2 + 1 for crop, _ in setr_crops()]
