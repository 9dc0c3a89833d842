"""Train SETR with mmsegmentation's recipe, sharded with FSDP2.

    # anywhere (no GPU, no dataset): the CPU demo preset on built-in synthetic data
    torchrun --standalone --nproc_per_node=2 train/main.py --head pup
    python train/main.py --head pup                       # the same in a single process

    # one node, 8 GPUs, ADE20K, SETR-PUP (mmseg's setr_vit-l_pup_8xb2-160k_ade20k-512x512)
    torchrun --nproc_per_node=8 train/main.py --head pup \
        --data-root /data/ADEChallengeData2016 --pretrained vit_large_p16_384.pth

    # multi-node (run on every node; the work dir must be on storage all nodes share; --local_addr:
    # this node's address, where hostnames do not resolve between the nodes)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=setr --local_addr=ADDR train/main.py --head pup --data-root ... --work-dir /shared/runs/pup

    # continue a stopped run exactly where it was (--overwrite instead: delete it, start again)
    torchrun --nproc_per_node=8 train/main.py --head pup --data-root ... --resume auto

Exit status: 0 finished (or already finished), 130 / 143 stopped by SIGINT / SIGTERM after
the final checkpoint, 2 bad input or configuration, 1 any other failure. An error on any rank
ends the whole job.

`python train/main.py --help` lists the flags; train/config.py documents every field.
"""
import os
import sys

if __package__ in (None, ""):  # `python train/main.py` / `torchrun train/main.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shutil  # noqa: E402
import traceback  # noqa: E402

# torch-free modules only here: the command line is parsed (and --help answered) before torch and the
# model load; the functions below import the rest where they need it.
from setr.cli import BAD_INPUT, FAILED  # noqa: E402
from setr.data.datasets import DataError  # noqa: E402
from setr.files import check_writable_dir, first_line  # noqa: E402
from setr.run_dir import (CHECKPOINTS, CONFIG, FINAL, CheckpointError, DamagedCheckpoint, read_meta,  # noqa: E402
                          run_config)
from train.config import ConfigError, config_differences, parse_config  # noqa: E402

EXIT_CODES = {"finished": 0, "SIGINT": 130, "SIGTERM": 143}  # 128 + signal number after a stop
RUN_FILES = (CONFIG, CHECKPOINTS, FINAL)  # any of them: the work dir holds a run


def check_work_dir(cfg):
    """Fail now, not at the first checkpoint, when the run directory cannot be written (checked on
    the work dir, or the nearest folder above it that exists: nothing is created here; the first
    files of the run create it), and never start over in a directory that holds a run unless
    asked to."""
    work_dir, c = cfg.work_dir, cfg.checkpoint
    try:
        check_writable_dir(work_dir)
    except OSError as e:
        raise ConfigError(f"--work-dir {work_dir!r} is not writable ({e.strerror or e})") from None
    if c.resume and c.overwrite:
        raise ConfigError(f"--resume {c.resume} and --overwrite contradict each other: continue the run in "
                          f"{work_dir} or delete it, not both")
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(work_dir, name))]
    if held and not c.resume and not c.overwrite:
        raise ConfigError(f"--work-dir {work_dir} holds a run ({', '.join(held)}): pass --resume auto to "
                          f"continue it, or --overwrite to delete it and start from scratch (or choose "
                          f"another --work-dir)")


def resumed_checkpoint(cfg):
    """(path, meta) of the checkpoint --resume will load (with 'auto', the first one whose
    meta.json reads: the trainer falls back past a damaged one, saying so), or None."""
    from train.checkpoint import resolve_resume

    for path in resolve_resume(cfg.checkpoint.resume, cfg.work_dir):
        try:
            return path, read_meta(path)
        except DamagedCheckpoint:
            continue
    return None


def finished_iteration(cfg, resumed):
    """With --resume auto: the iteration of the run in work_dir when it already reached max_iters
    and exported its model. resumed: resumed_checkpoint(cfg)."""
    if cfg.checkpoint.resume != "auto" or resumed is None:
        return None
    it = int(resumed[1]["iteration"])
    exported = not cfg.checkpoint.export or os.path.isfile(os.path.join(cfg.work_dir, FINAL))
    return it if it >= cfg.schedule.max_iters and exported else None  # else: finish (evaluate, export)


def check_same_run(cfg, resumed):
    """--resume: refused when the config of the checkpoint it loads (its meta.json keeps it), or
    the config.json of the run in the work dir it writes into, differs from this config in a
    field that defines what is trained (train/config.py, RESUME_MAY_CHANGE). resumed:
    resumed_checkpoint(cfg)."""
    if not cfg.checkpoint.resume:
        return
    saved = []
    if resumed is not None and isinstance(resumed[1].get("config"), dict):
        saved.append((f"the checkpoint {resumed[0]}", resumed[1]["config"]))
    run = run_config(cfg.work_dir)
    if run is not None:
        saved.append((f"the run in {cfg.work_dir}", run))
    for where, config in saved:
        differences = config_differences(config, cfg)
        if differences:
            what = "; ".join(f"{name} {theirs!r} there, {ours!r} here" for name, theirs, ours in differences)
            raise ConfigError(f"--resume {cfg.checkpoint.resume}: {where} has another config ({what}): resume it "
                              f"with its own settings, or start a new run (another --work-dir, or --overwrite "
                              f"to delete the run in it)")


def start_run_files(cfg):
    """Rank 0, when the run logs its first event (every check passed on every rank, the first
    iteration is done): --overwrite deletes the previous run, then config.json is written."""
    if cfg.checkpoint.overwrite:
        clear_run(cfg.work_dir)
    cfg.save(os.path.join(cfg.work_dir, CONFIG))


def clear_run(work_dir):
    """--overwrite: delete what a previous run wrote in work_dir (train.plot's default PNG too)."""
    for name in RUN_FILES + ("metrics.jsonl", "train.log", "tensorboard", "memory_snapshot", "curves.png"):
        path = os.path.join(work_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def first_failed_rank(failed, device):
    """Every rank, together: the lowest rank with failed=True, or None."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    flag = torch.tensor([dist.get_rank() if failed else world], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return None if int(flag) == world else int(flag)


def say(rank, text):
    import torch.distributed as dist

    prefix = f"rank {rank}: " if dist.is_initialized() and dist.get_world_size() > 1 else ""
    print(f"{prefix}{text}", file=sys.stderr, flush=True)


def setup(cfg, rank, world_size, device):
    """Checks and data, on every rank; returns (exit code or None to train, data). An error is
    printed once, by the lowest rank that hit it, and every rank stops. Nothing is written yet."""
    from train.build import build_data

    error = finished = data = None
    try:
        cfg.validate(world_size)
        check_work_dir(cfg)
        resumed = resumed_checkpoint(cfg)
        check_same_run(cfg, resumed)
        finished = finished_iteration(cfg, resumed)
        if finished is None:
            data = build_data(cfg)  # before any model work, so that a bad dataset fails fast
    except (ConfigError, CheckpointError, DataError) as e:
        error = e
    first = first_failed_rank(error is not None, device)  # also the barrier before anything is written
    if first is not None:
        if rank == first:
            say(rank, f"error: {error}")
        return BAD_INPUT, None
    if finished is not None:
        if rank == 0:
            print(f"the run in {cfg.work_dir} already finished (iteration {finished} of "
                  f"{cfg.schedule.max_iters}): nothing to do", flush=True)
        return 0, None
    return None, data


def main(argv=None):
    cfg = parse_config(argv)
    import torch
    import torch.distributed as dist

    from train.checkpoint import CheckpointWriteError
    from train.logger import Logger
    from train.parallelize import destroy_distributed, first_to_report, init_distributed, watch_job

    device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    watch_job()  # under torchrun: exit when the launcher dies or another rank failed
    rank, log, clean = int(os.environ.get("RANK", 0)), None, False
    try:
        rank, world_size, local_rank = init_distributed(device_type)
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # cores / processes on this node, minus the data workers: oversubscribed OpenMP spins (10x slower)
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // per_node - cfg.data.num_workers))
        device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
        code, data = setup(cfg, rank, world_size, device)
        if code is not None:
            clean = True  # every rank stops here together
            return code
        log = Logger(cfg.work_dir, rank, cfg.schedule.max_iters, cfg.metrics.progress_bar, cfg.metrics.tensorboard,
                     before_files=lambda: start_run_files(cfg))
        code = EXIT_CODES[train(cfg, data, device, log)]
        clean = True
        return code
    except (ConfigError, CheckpointError, DataError, CheckpointWriteError) as e:
        if first_to_report():
            say(rank, f"error: {e}")
        clean = not dist.is_initialized()
        return FAILED if isinstance(e, CheckpointWriteError) else BAD_INPUT
    except Exception as e:  # noqa: BLE001
        if not first_to_report():
            pass  # an echo of the error another rank reported (its collectives failed)
        elif isinstance(e, dist.DistError) or "/gloo/" in str(e):  # a collective failed: a peer went down
            say(rank, f"stopped: a collective failed, another rank probably failed first "
                      f"({first_line(e, type(e).__name__, 200)})")
        else:  # a bug: the traceback, from this rank only
            traceback.print_exc()
        return FAILED
    finally:
        if log:
            log.close()
        alone = dist.is_initialized() and dist.get_world_size() == 1
        if clean or alone:  # a failed rank does not wait for the others: they may be inside a collective
            destroy_distributed()


def train(cfg, data, device, log):
    """Build the model, shard it, resume and train; returns Trainer.train()'s status. The work dir
    is written from the first logged iteration on (Logger), when every check has passed."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from train.build import build_model, eval_copy
    from train.parallelize import parallelize
    from train.trainer import Trainer

    for note in cfg.notes:
        log.info(note)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        log.info(f"torchrun restarted the job (restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of "
                 f"--max-restarts {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} on this node)")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    model = build_model(cfg, device, log)
    eval_model = eval_copy(model)  # plain copy for evaluation, refreshed from the shards
    model = parallelize(model, cfg, init_device_mesh(device.type, (dist.get_world_size(),)))
    trainer = Trainer(cfg, model, eval_model, data, device, log)
    log.info(trainer.describe())
    log.info(f"work dir {os.path.abspath(cfg.work_dir)} (config.json, metrics.jsonl, train.log, checkpoints/)")
    trainer.resume()
    return trainer.train()


def run():
    """The process entry point (`python train/main.py`, each rank under torchrun): main(), then exit without
    interpreter teardown: nothing is left to do, and a hung peer or worker must not keep us here."""
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    run()
