"""The ops the model calls, with the implementation chosen by name.

`impl` is "eager" (plain PyTorch: the baseline), "sdpa" (PyTorch's best built-in for each op) or
"triton" (our kernels in `kernels/`), or a dict naming one implementation per op, e.g.
`{"attention": "triton", "layer_norm": "eager", "upsample": "triton", "loss": "triton"}`
(ops left out run "eager"). What runs:

    op          "eager"                      "sdpa"                          "triton"
    attention   softmax(q k^T / sqrt(d)) v   F.scaled_dot_product_attention  kernels.attention_qkv_packed
    layer_norm  F.layer_norm                 F.layer_norm                    kernels.layer_norm, add_layer_norm
    upsample    F.interpolate (bilinear)     F.interpolate (bilinear)        kernels.upsample_bilinear
    loss        F.interpolate, cross_entropy F.interpolate, cross_entropy    kernels.upsample_cross_entropy

"triton" also fuses the pre-norm residual add into the LayerNorm, and the loss's upsample into
the cross-entropy (the heads then classify before their last upsample: the two commute).
PyTorch's best built-in for LayerNorm, upsample and the loss is the eager call itself, so a
per-op dict accepts only "eager" or "triton" for them (`OP_IMPLS`); "sdpa" names an attention.
Every function below takes the already-resolved name for its op.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.attention import merge_heads, split_heads
from setr.constants import IMPLS

OP_IMPLS = {"attention": IMPLS, "layer_norm": ("eager", "triton"),
            "upsample": ("eager", "triton"), "loss": ("eager", "triton")}


def resolve_impl(impl):
    """'eager' | 'sdpa' | 'triton' | {op: name} -> {op: name} for every op in OP_IMPLS."""
    if isinstance(impl, str):
        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r}; expected one of {IMPLS} or a dict {{op: name}}")
        # "sdpa": F.scaled_dot_product_attention; the other ops' best built-in is the eager call
        return {op: impl if impl in names else "eager" for op, names in OP_IMPLS.items()}
    unknown = set(impl) - set(OP_IMPLS)
    if unknown:
        raise ValueError(f"impl: unknown op(s) {sorted(unknown)}; expected keys from {tuple(OP_IMPLS)}")
    resolved = {op: impl.get(op, "eager") for op in OP_IMPLS}
    for op, name in resolved.items():
        if name not in OP_IMPLS[op]:
            raise ValueError(f"impl[{op!r}] = {name!r} is not an implementation of {op}; expected one "
                             f"of {OP_IMPLS[op]}")
    return resolved


# --- attention -----------------------------------------------------------------------------

def attention_packed(qkv, num_heads, impl):
    """Self-attention on the packed in-projection output.

    qkv: (B, N, 3*C) laid out [q; k; v] along the last dim, each (num_heads, C // num_heads),
    as nn.MultiheadAttention's in_proj produces it. Returns (B, N, C), scale 1/sqrt(head_dim).
    """
    if impl == "triton":
        return kernels.attention_qkv_packed(qkv, num_heads)
    q, k, v = split_heads(qkv, num_heads)  # (B, H, N, D) views
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        attn = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, N, N)
        out = attn.softmax(dim=-1) @ v
    return merge_heads(out)


# --- layer norm ----------------------------------------------------------------------------

def layer_norm(x, weight, bias, eps, impl):
    if impl == "triton":
        return kernels.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps, impl):
    """h = x + residual; y = layer_norm(h). Returns (h, y); one pass under impl='triton'."""
    if impl == "triton":
        return kernels.add_layer_norm(x, residual, weight, bias, eps)
    h = x + residual
    return h, F.layer_norm(h, h.shape[-1:], weight, bias, eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim; `forward(x, residual)` also returns the residual sum."""

    def __init__(self, dim, eps=1e-6, impl="eager", device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x, residual=None):
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps, self.impl)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, self.impl)


# --- bilinear upsample and the segmentation loss -------------------------------------------

def upsample(x, size, impl):
    """Bilinear resize of (B, C, H, W) to `size` (h, w), F.interpolate semantics, align_corners=False."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x  # bilinear with align_corners=False and scale 1 is the identity
    if impl == "triton":
        return kernels.upsample_bilinear(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def seg_loss(logits, labels, ignore_index, impl):
    """mmseg's decode-head loss: CE of the logits resized to the label size, ignored pixels 0,
    summed and divided by all label pixels (avg_non_ignore=False).

    logits: (B, K, h, w); labels: (B, H, W) int64. Returns a scalar in float32 for half-precision
    logits (bf16 / fp16), else in the logits' dtype (float64 stays float64).
    Under impl='triton' the resize and the loss are fused and the full-resolution logits
    are never stored.
    """
    if impl == "triton":
        return kernels.upsample_cross_entropy(logits, labels, ignore_index=ignore_index)
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return loss.sum() / labels.numel()
