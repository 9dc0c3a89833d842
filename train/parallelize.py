"""Distributed setup and model parallelization: synchronized BatchNorm, activation checkpointing,
torch.compile and FSDP2, applied in that order (the model code itself has no parallelism).

    model = build_setr(...)                 # plain module, the same init on every rank (seeded)
    parallelize(model, cfg, mesh)           # SyncBN -> AC per block -> compile per block
                                            #   -> fully_shard per block, backbone rest, heads, root
"""
import datetime
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from train.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------

def init_distributed(device_type):
    """Join the torchrun process group (gloo on CPU, NCCL on GPU), or create a single-process
    group when started as plain `python train/main.py`. Returns (rank, world_size, local_rank)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
            if per_node > gpus:  # every rank checks, so every rank stops (none waits for the others)
                raise ConfigError(f"{per_node} processes per node (--nproc_per_node) but this node has "
                                  f"{gpus} GPU(s): start at most {gpus}, or pass --device cpu")
            torch.cuda.set_device(local_rank)
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


# ----------------------------------------------------------------------------------------------
# Synchronized BatchNorm
# ----------------------------------------------------------------------------------------------

def _all_reduce(t, group):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


class _SyncBNFunction(torch.autograd.Function):
    """y = (x - mean) * rsqrt(var + eps) * weight + bias with mean / var over (N, H, W) of every
    rank; statistics in float32 or wider (two passes: mean, then squared deviations).

    Backward returns, for this rank's input, the gradient of the sum of all ranks' losses
    (as torch.nn.SyncBatchNorm); weight / bias grads are this rank's share and get averaged
    across ranks by FSDP like every other parameter's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):  # x: (N, C, H, W)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # (C sums, 1 count) in float64: exact counts and sums for any batch size
        stats = torch.cat([xf.sum(dims).double(), torch.full((1,), x.numel() // C, dtype=torch.float64,
                                                               device=x.device)])
        _all_reduce(stats, group)
        count = stats[-1].to(xf.dtype)
        mean = (stats[:C] / stats[-1]).to(xf.dtype)
        shape = [1, C] + [1] * (x.dim() - 2)
        xc = xf - mean.view(shape)
        var = _all_reduce((xc * xc).sum(dims), group) / count  # biased, for normalization
        invstd = torch.rsqrt(var + eps)
        y = xc * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(xf.dtype).view(shape) + bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.count = group, count
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gc):
        x, weight, mean, invstd = ctx.saved_tensors
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        g = grad_y.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)  # this rank's shares, (C,) each
        grad_w = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = _all_reduce(torch.cat([sum_g, sum_gx]), ctx.group) / ctx.count
            mean_g, mean_gx = both[:C], both[C:]
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = (g - mean_g.view(shape) - xhat * mean_gx.view(shape)) * scale.view(shape)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch (all ranks), with
    torch.nn.SyncBatchNorm's semantics: normalization by the biased variance, running_var
    updated with the unbiased one, momentum 0.1. Works on CPU (gloo) and GPU, in any dtype
    (statistics in float32), and in a single process (then it equals BatchNorm2d).
    Same parameter and buffer names as BatchNorm2d, so state dicts are unchanged."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects (N, C, H, W), got shape {tuple(x.shape)}")
        if not self.training:
            dtype = torch.promote_types(x.dtype, torch.float32)
            w = self.weight.to(dtype) if self.weight is not None else None
            b = self.bias.to(dtype) if self.bias is not None else None
            return F.batch_norm(x.to(dtype), self.running_mean.to(dtype), self.running_var.to(dtype), w, b,
                                False, 0.0, self.eps).to(x.dtype)
        y, mean, var, count = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        return y


def convert_sync_batchnorm(module, process_group=None):
    """Replace every nn.BatchNorm2d in `module` by a SyncBatchNorm2d holding the same tensors."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, process_group=process_group,
                                  device=child.running_mean.device if child.running_mean is not None else None)
            with torch.no_grad():
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                if child.track_running_stats:
                    new.running_mean.copy_(child.running_mean)
                    new.running_var.copy_(child.running_var)
                    new.num_batches_tracked.copy_(child.num_batches_tracked)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, process_group)
    return module


# ----------------------------------------------------------------------------------------------
# AC, compile, FSDP2
# ----------------------------------------------------------------------------------------------

def apply_activation_checkpointing(model):
    """Recompute each transformer block's activations in backward (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

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
    head + auxiliary heads, then the root (cls token and pos embed: small, kept gathered).
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
    heads = [m for m in (model.neck, model.decode_head, model.auxiliary_head)
             if m is not None and any(True for _ in m.parameters())]
    fully_shard(heads, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)  # root: its params are needed right away
    return model


def parallelize(model, cfg, mesh):
    """Apply, in this order: SyncBN (heads), activation checkpointing, compile, FSDP2."""
    if cfg.parallel.sync_bn:
        convert_sync_batchnorm(model)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.parallel.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, cfg.parallel.precision)
    return model
