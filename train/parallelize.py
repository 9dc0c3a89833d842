"""Distributed setup (process group; how long ranks and data workers live, so that a job never
outlives a failure) and model parallelization: synchronized BatchNorm, the recompute policy,
torch.compile and FSDP2, applied in that order (the model code itself has no parallelism).

    model = build_setr(...)                 # plain module, the same init on every rank (seeded)
    parallelize(model, cfg, mesh)           # SyncBN -> recompute (selective, or AC per block)
                                            #   -> compile per block
                                            #   -> fully_shard per block, patch embed, heads, root
"""
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
import warnings

import cv2
import torch
import torch.distributed as dist

from train.config import ConfigError
from train.sync_batchnorm import sync_batchnorm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------

def init_distributed(device_type):
    """Join the torchrun process group (gloo on CPU, NCCL on GPU), or create a single-process
    group when started as plain `python train/main.py`. Returns (rank, world_size, local_rank).

    Under torchrun the group meets in a namespace of torchrun's store that belongs to this
    attempt of the job (see _attempt_name), so that a job restarted by --max-restarts never
    reads the addresses (gloo) or unique id (NCCL) that the ranks of a failed attempt left there.
    What NCCL keeps outside that namespace is in NCCL_ROOT_KEYS."""
    global _attempt
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
            if per_node > gpus:  # every rank checks, so every rank stops (none waits for the others)
                raise ConfigError(f"{per_node} processes per node (--nproc_per_node) but this node has "
                                  f"{gpus} GPU(s): start at most {gpus}, or pass --device cpu")
            torch.cuda.set_device(local_rank)
        store = _job_store(timeout)
        if store is not None:  # torchrun's store, kept across restarts
            _attempt = _attempt_name(store, rank, world_size, timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"{_attempt}/", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or not torchrun: rank 0 hosts a new store each attempt
            dist.init_process_group(backend, timeout=timeout)
    else:
        local_rank = 0
        if device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), local_rank


def destroy_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


_attempt = None  # the namespace of this attempt of the job in torchrun's store: "setr/<run id>/<ticket>"

# What ProcessGroupNCCL writes outside the namespace it is given: it keeps a client of the root of
# the store (PrefixStore::getUnderlyingNonPrefixStore, its globalStore_) for "exception_dump"
# (kStoreDumpKey in ProcessGroupNCCL.hpp, torch 2.11 and 2.13 alike), the flight-recorder dump
# signal that a rank sets when one of its collectives times out (broadcastDumpSignal) and that the
# heartbeat monitor of every rank polls each second: it dumps, then aborts its process
# (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, 8 min, later). Left in torchrun's store by a failed attempt,
# it would abort every later one. Its other keys (the unique id, "remote_error:<group>") are
# under the namespace. Read in the headers and binaries, not run: no GPU here.
NCCL_ROOT_KEYS = ("exception_dump",)


def _job_prefix():
    return f"setr/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"


def _job_store(timeout=datetime.timedelta(seconds=5)):
    """A client of torchrun's key-value store, which outlives the ranks; None outside torchrun and
    when torchrun does not share it with the ranks (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: MASTER_PORT
    is then a store that rank 0 starts in init_process_group, new at each attempt)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timeout)


def _attempt_name(store, rank, world_size, timeout):
    """A name for this attempt of the job in torchrun's store, the same on every rank and new at
    every restart: the namespace of the process group's keys and of the errors ranks report.

    torchrun keeps its store, and every key in it, across the restarts of --max-restarts, and
    TORCHELASTIC_RESTART_COUNT counts the restarts of one node only (a node restarted because
    another one failed keeps its count), so neither can name an attempt. A ticket drawn from one
    counter of the store (which every node shares) is newer than every ticket drawn before it:
    rank 0's ticket names the attempt, and every other rank reads the name under a key made of its
    own ticket, which no earlier attempt can have written. Rank 0 answers every ticket drawn since
    the previous attempt's rank 0 drew its own, and first deletes NCCL_ROOT_KEYS: no rank of the
    new attempt makes its process group before it has an answer.

    Which old ranks may still run: with the c10d rendezvous (also --standalone), torchrun restarts
    every node together (each node stops its ranks before it joins the next round, which closes
    only when every node joined), so no rank of an earlier attempt is alive when one of the new
    attempt starts, and nothing stale can be written after the delete. With the static rendezvous
    (torchrun's default backend, --master_addr and --node_rank), a node restarts only its own
    ranks, at once; the other nodes' ranks run on until they fail by themselves: gloo's next
    collective fails within seconds, NCCL's may only at the collective timeout (30 min), which
    also sets "exception_dump" again, after the delete: the new attempt's ranks then abort once
    more. Meanwhile the new ranks wait here (up to the same 30 min) for every node to restart,
    and each node spends its own --max-restarts. Multi-node restarts: use the c10d rendezvous."""
    prefix = _job_prefix()
    ticket = store.add(prefix + "tickets", 1)
    if rank != 0:
        key = f"{prefix}name_for/{ticket}"
        store.wait([key], timeout)
        name = store.get(key).decode()
        store.add(f"{name}/joined", 1)
        return name
    # rank 0: answer every ticket drawn since the previous attempt's rank 0 drew its own (older
    # ones belong to that attempt or earlier ones: answered, or dead), until every rank joined
    for key in NCCL_ROOT_KEYS:
        store.delete_key(key)
    name, leader = f"{prefix}{ticket}", prefix + "leader"
    answered = int(store.get(leader)) if store.check([leader]) else 0
    store.set(leader, str(ticket))
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"{name}/joined", 0) < world_size - 1:
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"rank 0: only {store.add(f'{name}/joined', 0)} of the other {world_size - 1} "
                               f"ranks joined within {timeout}")
        drawn = store.add(prefix + "tickets", 0)
        for t in range(answered + 1, drawn + 1):
            store.set(f"{prefix}name_for/{t}", name)
        answered = drawn
        time.sleep(0.05)
    return name


def _errors_key():
    """Errors reported by the ranks of this attempt of the job (None before it joined)."""
    return f"{_attempt}/errors" if _attempt else None


def first_to_report():
    """True for the first rank of the job that reports an error, so that an error every rank hits,
    or its echo on the ranks that were waiting for the failed one, is printed once. True as
    well without a store to ask (a single process, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: every
    rank says it; or the launcher is gone)."""
    key = _errors_key()
    if key is None:  # before this attempt joined: no store to ask
        return True
    try:
        store = _job_store()
        return store is None or store.add(key, 1) == 1
    except Exception:  # noqa: BLE001 - say it anyway
        return True


def watch_job(grace=10.0):
    """Under torchrun, end this process when the launcher dies (it starts every rank in a session
    of its own, so a launcher killed with SIGKILL would otherwise leave its ranks running), and,
    where the ranks share torchrun's store, `grace` seconds after another rank reported an error
    (this one may be stuck in a collective that waits for the failed rank, e.g. NCCL across nodes)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    try:
        store = _job_store()
    except Exception:  # noqa: BLE001 - no store to watch: the launcher is still watched
        store = None

    def end(why):
        print(f"rank {os.environ.get('RANK', '?')}: {why}: exiting", file=sys.stderr, flush=True)
        os._exit(1)

    def reported():
        try:
            return store.add(_errors_key(), 0) if store is not None and _errors_key() else 0  # once joined
        except Exception:  # noqa: BLE001 - the store is the launcher's: its death is caught next time
            return 0

    def watch():
        failed_at = None
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                end(f"the launcher (pid {parent}) is gone")
            failed_at = failed_at or (time.monotonic() if reported() else None)
            if failed_at and time.monotonic() - failed_at > grace:
                end("another rank failed")
    threading.Thread(target=watch, name="watch-job", daemon=True).start()


def data_worker_init(parent_pid, _worker_id):
    """DataLoader worker_init_fn (bind parent_pid = the training process's pid). The worker
    leaves the training process's process group: Ctrl-C (sent to the terminal's group) and
    torchrun's SIGTERM (sent to the rank's session) then reach only the training process, which
    writes its final checkpoint before it stops the workers. A direct kill still stops a worker,
    and the kernel kills it (SIGKILL) when the training process dies, however that happens."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: PyTorch's own worker watchdog remains (5 s)
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    cv2.setNumThreads(0)  # OpenCV runs sequentially in a worker: workers x ranks already fill the cores


# ----------------------------------------------------------------------------------------------
# Recompute, compile, FSDP2
# ----------------------------------------------------------------------------------------------

def apply_recompute(model, policy):
    """The memory policy (train.config.RECOMPUTE), for every impl; the gradients are the same:
    none       autograd keeps what it keeps
    selective  the blocks' GELU and pre-attention LayerNorm outputs and the Naive / PUP heads'
               upsampled conv inputs are recomputed in the backward (SETR.set_recompute)
    full       selective in the heads, and each transformer block checkpointed whole: it keeps only
               its input and runs its forward again in the backward"""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.set_recompute("none" if policy == "none" else "selective")
    if policy == "full":
        layers = model.backbone.layers
        for i, block in enumerate(layers):
            block.recompute = False  # the whole block is recomputed: no selective recompute inside it
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model):
    """torch.compile each transformer block (all blocks share one compiled graph)."""
    layers = model.backbone.layers
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block, fullgraph=True)


def apply_fsdp(model, mesh, precision):
    """FSDP2: one unit per transformer block, one for the patch embedding, one for neck + decode
    head + each auxiliary head, then the root (cls token and pos embed: small, kept gathered).
    bf16 / fp16: parameters cast for compute, gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp32":
        mp = MixedPrecisionPolicy()
    else:
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp)
    # PatchEmbed returns a transposed view of the conv output; the ViT only reads it (torch.cat),
    # so FSDP's warning about in-place ops on returned views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPPatchEmbed\) returned a view")
    for block in model.backbone.layers:
        fully_shard(block, **kw)
    fully_shard(model.backbone.patch_embed, **kw)
    # the modules that run forward themselves (not the aux heads' ModuleList: FSDP hooks a unit's
    # forward, and a module that never runs one leaves its group without pre-backward / reshard)
    heads = [m for m in (model.neck, model.decode_head, *model.auxiliary_head)
             if m is not None and any(True for _ in m.parameters())]
    if precision != "fp32":
        # BatchNorm keeps float32 weights beside its float32 running statistics (PyTorch's kernels
        # refuse a bf16 weight with float32 statistics); its low-precision input stays as it is
        norm_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        norms = [m for head in heads for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            fully_shard(norm, mesh=mesh, mp_policy=norm_mp)
    fully_shard(heads, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)  # root: its params are needed right away
    return model


def parallelize(model, cfg, mesh):
    """Apply, in this order: SyncBN (heads), the recompute policy, compile, FSDP2."""
    if cfg.parallel.sync_bn:
        model = sync_batchnorm(model, mesh.device_type)
    apply_recompute(model, cfg.parallel.recompute)
    if cfg.parallel.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, cfg.parallel.precision)
    return model
