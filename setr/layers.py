"""The ops the model calls, with the implementation chosen by name.

`impl` is "eager" (plain PyTorch math: the baseline), "sdpa" (PyTorch's fused built-ins) or
"triton" (our kernels in `kernels/`), or a dict naming one of those per op, e.g.
`{"attention": "triton", "layer_norm": "eager", "upsample": "triton", "loss": "triton"}`.
Every function below takes the already-resolved name for its op.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention_qkv_packed, merge_heads, split_heads

IMPLS = ("eager", "sdpa", "triton")
OPS = ("attention", "layer_norm", "upsample", "loss")


def resolve_impl(impl):
    """'eager' | 'sdpa' | 'triton' | {op: name} -> {op: name} for every op in OPS."""
    if isinstance(impl, str):
        impl = {op: impl for op in OPS}
    impl = dict(impl)
    unknown = set(impl) - set(OPS)
    if unknown:
        raise ValueError(f"impl: unknown op(s) {sorted(unknown)}; expected keys from {OPS}")
    for op in OPS:
        impl.setdefault(op, "eager")
        if impl[op] not in IMPLS:
            raise ValueError(f"impl[{op!r}] = {impl[op]!r}; expected one of {IMPLS}")
    return impl


# --- attention -----------------------------------------------------------------------------

def attention_packed(qkv, num_heads, impl):
    """Self-attention on the packed in-projection output.

    qkv: (B, N, 3*C) laid out [q; k; v] along the last dim, each (num_heads, C // num_heads),
    as nn.MultiheadAttention's in_proj produces it. Returns (B, N, C), scale 1/sqrt(head_dim).
    """
    if impl == "triton":
        return attention_qkv_packed(qkv, num_heads)
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
        from kernels.layer_norm import layer_norm as triton_layer_norm

        return triton_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps, impl):
    """h = x + residual; y = layer_norm(h). Returns (h, y); one pass under impl='triton'."""
    if impl == "triton":
        from kernels.layer_norm import add_layer_norm as triton_add_layer_norm

        return triton_add_layer_norm(x, residual, weight, bias, eps)
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

def upsample(x, size, impl, align_corners=False):
    """Bilinear resize of (B, C, H, W) to `size` (h, w), F.interpolate semantics."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x  # bilinear with align_corners=False and scale 1 is the identity
    if impl == "triton":
        from kernels.upsample import upsample_bilinear

        return upsample_bilinear(x, size, align_corners=align_corners)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def seg_loss(logits, labels, ignore_index, impl, align_corners=False):
    """mmseg's decode-head loss: CE of the logits resized to the label size, ignored pixels 0,
    summed and divided by all label pixels (avg_non_ignore=False). Returns a float32 scalar.

    logits: (B, K, h, w); labels: (B, H, W) int64.
    Under impl='triton' the resize and the loss are fused and the full-resolution logits
    are never stored.
    """
    if impl == "triton":
        from kernels.upsample_cross_entropy import upsample_cross_entropy

        return upsample_cross_entropy(logits, labels, ignore_index=ignore_index, align_corners=align_corners)
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return loss.sum() / labels.numel()
