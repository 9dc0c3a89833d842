"""Peak training memory of a SETR config at its real shapes, planned without a GPU.

The model is built on the meta device and parallelized by training's own code (bench/step.py)
over a fake process group of any world size. Under FakeTensorMode (tensors with shapes, dtypes
and storages but no data) training's step, `train.step.train_step`, runs twice, and
torch.distributed._tools' FSDPMemTracker counts every tensor it allocates: sharded and gathered
parameters, gradients, SGD momentum, activations, backward temporaries, collective buffers. The
first step creates the optimizer state; the second is reported. Fake tensors live on the CPU (FSDP2
needs CUDA streams, which a CPU-only torch cannot make); `kernels.utils.plan_as_cuda` sends them
down our kernels' GPU path: impl="triton" is planned through the custom ops' fake versions. A
Recorder (a dispatch mode inside the tracker) attributes the bytes to the model's parts. Not seen:
the CUDA context, workspaces, fragmentation (the caller adds an allowance) and torch.compile
(refused). `measure` runs the same two steps for real. Private PyTorch internals (tested on torch
2.11 and 2.13): the tracker's instrumentation methods, FSDP2's parameter groups, DTensor's shape
inference (dtensor_shape_inference_unseen).
"""
import bisect
import contextlib
import unittest.mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from bench import UsageError, run_config
from bench.step import build_parallel, random_batch
from kernels.utils import plan_as_cuda
from setr.constants import IMPLS, PATCH_SIZE
from train.step import build_step_state, train_step

# FSDPMemTracker's categories -> ours
CATEGORIES = {
    "Sharded Param": "params", "Buffer": "params", "Unsharded Param": "gathered params",
    "Sharded Grad": "grads", "Unsharded Grad": "grads", "OptState": "optimizer state",
    "Activation": "activations", "Temp": "temporaries", "All Gather": "all-gather/reduce-scatter",
    "Reduce Scatter": "all-gather/reduce-scatter", "Inputs": "inputs",
}
MODULES = ["inputs cast", "patch embed", "blocks", "neck", "decode head", "aux heads", "loss", "step"]


class PlanError(UsageError):
    """A config the planner cannot trace faithfully; the message says why."""


@contextlib.contextmanager
def fake_process_group(world_size):
    """A default process group of `world_size` fake ranks (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("a process group is already initialized: the planner needs its own fake one "
                        "(plan before init_process_group, or in another process)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def dtensor_shape_inference_unseen(fake_mode):
    """DTensor infers an op's output shape by running it on fake tensors of the global shapes: on a
    GPU in a fake mode of its own, allocating nothing; here in the planner's, where the tracker would
    count them (torch 2.11 infers at every op under a fake mode: the grad norm's inputs, as large as
    the unsharded gradients, planned MLA world 8 at 1.61 GiB, not 1.48). Within the context this
    returns, the inference runs in `fake_mode` with the tracking modes off."""
    infer = ShardingPropagator._propagate_tensor_meta_non_cached

    def unseen(self, op_schema):
        with _disable_current_modes(), fake_mode:
            return infer(self, op_schema)

    return unittest.mock.patch.object(ShardingPropagator, "_propagate_tensor_meta_non_cached", unseen)


def fsdp_param_groups(model):
    """The parameter group of every fully_shard unit of model, each once (a unit of several
    modules appears on each of them)."""
    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    return list({id(g): g for g in groups if g is not None}.values())


class FSDPGroupMemTracker(FSDPMemTracker):
    """FSDPMemTracker instrumented per FSDP parameter group instead of per module.

    The stock tracker swaps every unit's forward hooks for per-module ones: a unit of several
    modules (the heads) would be resharded after its first module, and fully_shard's hooks differ
    between torch releases. Here they stay; the tracker's phase (which tells collective buffers,
    gathered parameters and gradients apart) is set around the parameter group's pre/post forward
    and backward, which every unit runs. Activations recomputed in the backward are temporaries."""

    def _instrument_fsdp_module(self):
        self._groups = fsdp_param_groups(self._root_mod)
        for group in self._groups:
            self._instrument_fsdp_sharded_params_grads(group)
            group.pre_forward = self._phase(group.pre_forward, _FSDPState.PRE_FW, _FSDPState.FW,
                                            after=lambda g=group: self._tag_params(g))
            group.post_forward = self._phase(group.post_forward, _FSDPState.POST_FW, _FSDPState.POST_FW)
            group.pre_backward = self._phase(group.pre_backward, _FSDPState.PRE_BW, _FSDPState.BW)
            group.post_backward = self._phase(group.post_backward, _FSDPState.POST_BW, _FSDPState.POST_BW,
                                              before=lambda g=group: self._tag_grads(g, sharded=False),
                                              after=lambda g=group: self._tag_grads(g, sharded=True))
        for buffer in self._root_mod.buffers():
            self._update_and_maybe_create_winfos(buffer, _FSDPRefType.BUFFER)

    def _phase(self, method, during, after_state, before=None, after=None):
        def wrapped(*args, **kwargs):
            if before:
                before()
            self._fsdp_state = during
            out = method(*args, **kwargs)
            if after:
                after()
            self._fsdp_state = after_state
            return out
        return wrapped

    def _tag_params(self, group):
        for p in group.fsdp_params:
            self._update_and_maybe_create_winfos(p.unsharded_param, _FSDPRefType.UNSHARDED_PARAM)

    def _tag_grads(self, group, sharded):
        for p in group.fsdp_params:
            grad = p.sharded_param.grad if sharded else p._unsharded_param.grad
            if grad is not None:
                reftype = _FSDPRefType.SHARDED_GRAD if sharded else _FSDPRefType.UNSHARDED_GRAD
                self._update_and_maybe_create_winfos(grad, reftype, update_existing=not sharded)

    def _deregister_module_and_optimizer_hooks(self):
        for group in self._groups:
            for name in ("pre_forward", "post_forward", "pre_backward", "post_backward"):
                del group.__dict__[name]  # the class's methods again
        for handle in self._optimizer_hook_handles or ():
            handle.remove()
        self._optimizer_hook_handles = None


GROUPS = (("backbone.layers.", "blocks"), ("backbone", "patch embed"), ("neck", "neck"),
          ("decode_head", "decode head"), ("auxiliary_head", "aux heads"))  # module name prefix -> MODULES


def module_group(parents, seen_model_child):
    """Which reported module the innermost active module (ModTracker fqn) belongs to."""
    names = [n for n in parents if n != "Global"]
    if not names:
        return "step"
    rel = max(names, key=lambda n: n.count(".")).partition(".")[2]
    return next((g for prefix, g in GROUPS if rel.startswith(prefix)), "loss" if seen_model_child else "inputs cast")


class Recorder(TorchDispatchMode):
    """After every op of one step: the tracker's bytes by category, the step's peak (and where it
    happened) and, per reported module, its forward / backward peak and largest tensor. At the end
    of the forward: the activation bytes still alive, by the module whose op allocated them.

    In the forward the module is the innermost one running (ModTracker). In the backward it is the
    one whose forward created the autograd node being run: forward module changes are logged with
    the autograd sequence number, which numbers the nodes in creation order."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker, self.mods = tracker, ModTracker()
        self.modules = {m: dict(saved=0, peak_forward=0, peak_backward=0, largest=None) for m in MODULES}
        self.peak, self.peak_snapshot, self.peak_at = 0, {}, None
        self.forward_end, self.seen_child = None, False
        self.owner = WeakIdKeyDictionary()  # storage -> module group whose forward op allocated it
        self.node_starts, self.node_groups = [], []  # first autograd sequence number of each group run
        self.forward_end_seq, self.last_backward_group = None, "step"

    def current(self):
        out = dict.fromkeys(CATEGORIES.values(), 0)
        for dev_snap in self.tracker.get_tracker_snapshot().values():
            for k, v in dev_snap.items():
                if k != "Total":
                    out[CATEGORIES[k.value]] += v
        return out

    def forward_group(self, parents):
        """Log the module group that runs from now on in the forward, with the next sequence number."""
        group = module_group(parents, self.seen_child)
        self.seen_child |= group not in ("inputs cast", "step", "loss")
        if not self.mods.is_bw and (not self.node_groups or self.node_groups[-1] != group):
            self.node_starts.append(torch._C._autograd._get_sequence_nr())
            self.node_groups.append(group)

    def backward_group(self):
        node = torch._C._current_autograd_node()
        if node is None:  # FSDP's end-of-backward callback: gradient reduce-scatter
            return "step"
        if node._sequence_nr() >= self.forward_end_seq:  # a graph recomputed inside a backward node
            return self.last_backward_group
        i = bisect.bisect_right(self.node_starts, node._sequence_nr()) - 1
        self.last_backward_group = self.node_groups[i] if i >= 0 else "step"
        return self.last_backward_group

    def mark_forward_end(self):
        self.forward_end = self.current()
        self.forward_end_seq = torch._C._autograd._get_sequence_nr()
        self.forward_group({"Global"})
        for st, group in self.owner.items():
            winfo = self.tracker._WINFO.get(st, (None, None))[0]
            if winfo is not None and winfo.reftype == _FSDPRefType.ACT:
                self.modules[group]["saved"] += winfo.mem_consumed

    def __enter__(self):
        after = lambda m, _i, _o: self.forward_group(self.mods.parents - {self.mods.get_known_fqn(m)})  # noqa: E731
        self.mods.register_user_hooks(lambda _m, _i: self.forward_group(self.mods.parents), after)
        self.mods.__enter__()
        return super().__enter__()

    def __exit__(self, *args):
        super().__exit__(*args)
        self.mods.__exit__(*args)
        self.mods.clear_user_hooks()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        backward = self.mods.is_bw
        group = self.backward_group() if backward else self.node_groups[-1] if self.node_groups else "step"
        snap = self.current()
        total = sum(snap.values())
        stats = self.modules[group]
        phase = "peak_backward" if backward else "peak_forward"
        stats[phase] = max(stats[phase], total)
        if total > self.peak:
            self.peak, self.peak_snapshot = total, snap
            self.peak_at = f"{group} {'backward' if backward else 'forward'}"
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if stats["largest"] is None or t.numel() > stats["largest"][0]:
                stats["largest"] = (t.numel(), list(t.shape), str(t.dtype).replace("torch.", ""))
            if not backward and self.forward_end is None:
                for st in get_untyped_storages(t):
                    self.owner.setdefault(st, group)
        return out


def check_config(impl, batch, world_size, crop, compile_=False):
    if compile_:
        raise PlanError("--compile on cannot be planned: FakeTensorMode and FSDPMemTracker follow eager ops, "
                        "and torch.compile fuses ops and frees tensors where they cannot see it (plan with "
                        "--compile off: the compiled step should not need more)")
    if impl not in IMPLS:
        raise PlanError(f"impl {impl!r} cannot be planned; expected one of {IMPLS}")
    if batch < 1 or world_size < 1 or crop < PATCH_SIZE or crop % PATCH_SIZE:
        raise PlanError(f"batch and world size must be >= 1 and the crop a multiple of {PATCH_SIZE}, got batch "
                        f"{batch}, world size {world_size}, crop {crop}")


def plan(preset, impl, batch, recompute, world_size=1, precision="bf16", crop=None, compile_=False,
         backbone="vit_large", num_classes=None, aux=True):
    """Plan one config of a training preset (batch is per rank; crop and classes the preset's unless
    given). Returns bytes: the second step's peak and its breakdown by category, what is alive at
    the end of the forward, and per module what its forward keeps for the backward ("saved"), its
    own forward / backward peak and its largest tensor."""
    cfg = run_config(preset, impl, recompute, precision, False, backbone, crop, num_classes, aux)
    crop, num_classes = cfg.data.crop_size[0], cfg.model.num_classes
    check_config(impl, batch, world_size, crop, compile_)
    with fake_process_group(world_size):
        model = build_parallel(cfg, "meta")
        # allow_non_fake_inputs: the meta parameters become fake tensors in to_empty
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, plan_as_cuda(), \
                dtensor_shape_inference_unseen(fake_mode):
            model.to_empty(device="cpu")  # no data, so no init either
            state = build_step_state(cfg, model, "cpu")
            batches = [random_batch(batch, crop, num_classes, "cpu")]
            tracker = FSDPGroupMemTracker(model, state.optimizer)
            tracker.track_inputs(batches[0])
            with tracker:
                train_step(state, batches, sync=False)  # creates the momentum buffers
                tracker.reset_mod_stats()
                rec = Recorder(tracker)
                hook = model.register_forward_hook(lambda *_: rec.mark_forward_end())
                with rec:
                    train_step(state, batches, sync=False)
                hook.remove()
    saved = sum(m["saved"] for name, m in rec.modules.items() if name != "step")
    return dict(peak=rec.peak, peak_at=rec.peak_at, peak_by_category=rec.peak_snapshot,
                forward_end=rec.forward_end, saved_activations=saved, modules=rec.modules)


def measure(preset, impl, batch, recompute, world_size=1, precision="bf16", crop=None, compile_=False,
            backbone="vit_large", num_classes=None, aux=True, device=None, snapshot=None):
    """The same two steps for real on `device` (default: CUDA when there is one), in a process
    group of `world_size` (one process, or torchrun with that many ranks). Returns the second
    step's torch.cuda.max_memory_allocated (None on CPU, where this only checks the code path) and
    grad norm; snapshot: a path for the second step's memory_viz snapshot (CUDA only)."""
    from train.parallelize import destroy_distributed, init_distributed

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    _, world, local_rank = init_distributed(device.type)
    try:
        if world != world_size:
            raise PlanError(f"measuring world size {world_size} needs that many ranks (torchrun "
                            f"--nproc_per_node={world_size}); this process group has {world}")
        device = torch.device("cuda", local_rank) if cuda else device
        cfg = run_config(preset, impl, recompute, precision, compile_, backbone, crop, num_classes, aux)
        state = build_step_state(cfg, build_parallel(cfg, device), device)
        batches = [random_batch(batch, cfg.data.crop_size[0], cfg.model.num_classes, device)]
        train_step(state, batches)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            if snapshot:
                torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
        out = train_step(state, batches)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        if cuda and snapshot:
            torch.cuda.memory._dump_snapshot(snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        return dict(measured_peak=peak, grad_norm=out["grad_norm"])
    finally:
        destroy_distributed()
