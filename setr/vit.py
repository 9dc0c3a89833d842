"""ViT backbone of SETR, the same network as mmsegmentation's `VisionTransformer`.

Module and parameter names mirror mmseg's state dict (`patch_embed.projection`,
`layers.i.attn.attn.in_proj_weight`, `layers.i.ffn.layers.0.0`, ...) so its checkpoints load
without any key conversion. Pre-norm blocks: x = x + attn(ln1(x)); x = x + ffn(ln2(x)).
"""
import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from setr import layers
from setr.constants import PATCH_SIZE, VIT_CONFIGS



def linear_grads(grad_out, x, weight, needs=(True, True, True)):
    """Gradients of F.linear(x, weight, bias) for x, weight, bias (None where not needed), op for op
    as autograd computes them for a contiguous (..., K) input: addmm on the flattened input.

    grad_out: (..., N); x: (..., K) contiguous; weight: (N, K)."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = g.mm(weight).view(x.shape) if needs[0] else None
    grad_w = g.t().mm(x.reshape(-1, x.shape[-1])) if needs[1] else None  # weight.t() is column-major
    grad_b = g.sum(0) if needs[2] else None
    return grad_x, grad_w, grad_b


def autocast_dtype(device_type):
    """The dtype torch.autocast runs matrix products in on this device type; None when it is off
    (or autocast has no such device type, e.g. meta)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class GeluLinear(torch.autograd.Function):
    """F.linear(gelu(h), weight, bias) keeping only h for the backward: the exact GELU is
    recomputed there (elementwise: the same values), saving the (B, N, 4C) GELU output.

    Under torch.autocast the backward runs under the forward's autocast state, so that it casts
    and multiplies as F.linear's own backward does (in the autocast dtype); every gradient comes
    back in its input's dtype."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.autocast = autocast_dtype(h.device.type)
        ctx.bias_dtype = bias.dtype
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        autocast = torch.autocast(h.device.type, ctx.autocast) if ctx.autocast else contextlib.nullcontext()
        with autocast:
            grad_a, grad_w, grad_b = linear_grads(grad_out, F.gelu(h), weight, ctx.needs_input_grad)
        grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h) if grad_a is not None else None
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(ctx.bias_dtype) if grad_b is not None else None)


KEPT_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default)


def _keep_products(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of matrix products and convolutions,
    recompute everything else (norms, upsampling, views) in the backward."""
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_cheap(fn, *args):
    """fn(*args), keeping for the backward only args and the outputs of fn's matrix products and
    convolutions (selective activation checkpointing): the rest of fn runs again in the backward.
    The backward is autograd's own on the same recomputed values, so the gradients do not change;
    unlike a custom autograd.Function with a nested autograd.grad, torch.compile traces it."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,  # no randomness inside
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_products))


def resize_pos_embed(pos_embed, src_hw, dst_hw):
    """Resize the patch grid of a (1, 1 + h*w, C) pos-embed to dst_hw; the cls entry is kept.

    Bilinear with align_corners=False, as mmseg's `resize_pos_embed`, computed in float32 for
    half-precision weights and in float64 for float64 ones.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = pos_embed.shape[-1]
    grid = grid.reshape(1, src_hw[0], src_hw[1], C).permute(0, 3, 1, 2)
    grid = grid.to(torch.promote_types(grid.dtype, torch.float32))
    grid = F.interpolate(grid, size=tuple(dst_hw), mode="bilinear", align_corners=False)
    grid = grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


class PatchEmbed(nn.Module):
    """16x16 patches -> tokens. Pads bottom/right to a multiple of the patch ('corner')."""

    def __init__(self, embed_dims, patch_size=PATCH_SIZE, bias=True, device=None, dtype=None):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(3, embed_dims, patch_size, stride=patch_size, bias=bias,
                                    device=device, dtype=dtype)

    def forward(self, x):  # (B, 3, H, W) -> (B, h*w, C), (h, w)
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x)
        hw = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), hw


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj), batch first."""

    def __init__(self, embed_dims, num_heads, impl="eager", device=None, dtype=None):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims, device=device, dtype=dtype))
        self.out_proj = nn.Linear(embed_dims, embed_dims, device=device, dtype=dtype)

    def forward(self, x, norm=None):  # (B, N, C) -> (B, N, C); norm: a LayerNorm applied to x first
        if norm is not None:  # recomputed in the backward rather than kept
            qkv = recompute_cheap(lambda t: F.linear(norm(t), self.in_proj_weight, self.in_proj_bias), x)
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        out = layers.attention_packed(qkv, self.num_heads, self.impl)  # (B, N, C)
        return self.out_proj(out)


class Attention(nn.Module):
    """mmcv's MultiheadAttention wrapper; holds the projections under `.attn`."""

    def __init__(self, embed_dims, num_heads, impl="eager", device=None, dtype=None):
        super().__init__()
        self.attn = SelfAttention(embed_dims, num_heads, impl, device=device, dtype=dtype)

    def forward(self, x, norm=None):
        return self.attn(x, norm)


class FFN(nn.Module):
    """Linear -> GELU (exact) -> Linear, named as mmcv's FFN (`layers.0.0`, `layers.1`)."""

    def __init__(self, embed_dims, hidden_dims, device=None, dtype=None):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims, device=device, dtype=dtype), nn.GELU()),
            nn.Linear(hidden_dims, embed_dims, device=device, dtype=dtype),
        )

    def forward(self, x, recompute_gelu=False):
        if recompute_gelu:
            fc1, fc2 = self.layers[0][0], self.layers[1]
            return GeluLinear.apply(fc1(x), fc2.weight, fc2.bias)
        return self.layers(x)


class Block(nn.Module):
    """recompute=True (SETR.set_recompute) recomputes the GELU output and the pre-attention
    LayerNorm output in the backward instead of keeping them, for any impl; the gradients do not
    change. Checkpointing the whole block turns it off: the kept matrix products would outlive the
    block's discarded activations."""

    def __init__(self, embed_dims, num_heads, mlp_ratio=4, impl=None, device=None, dtype=None):
        super().__init__()
        impl = layers.resolve_impl(impl or "eager")
        dd = dict(device=device, dtype=dtype)
        self.recompute = False
        self.ln1 = layers.LayerNorm(embed_dims, eps=1e-6, impl=impl["layer_norm"], **dd)
        self.attn = Attention(embed_dims, num_heads, impl["attention"], **dd)
        self.ln2 = layers.LayerNorm(embed_dims, eps=1e-6, impl=impl["layer_norm"], **dd)
        self.ffn = FFN(embed_dims, mlp_ratio * embed_dims, **dd)

    def forward(self, x):  # (B, N, C)
        attn = self.attn(x, norm=self.ln1) if self.recompute else self.attn(self.ln1(x))
        h, y = self.ln2(x, residual=attn)  # h = x + attn(ln1(x)), y = ln2(h)
        return h + self.ffn(y, recompute_gelu=self.recompute)


class VisionTransformer(nn.Module):
    """ViT with a learned pos-embed for an `img_size` grid, resized on the fly for other sizes.

    forward(x) returns the outputs of the blocks in `out_indices` as NCHW maps (B, C, H/16, W/16).
    with_cls_token=False (MLA) drops the cls token before block 0; it stays in the state dict.
    """

    def __init__(self, img_size=512, patch_size=PATCH_SIZE, embed_dims=1024, num_layers=24, num_heads=16,
                 mlp_ratio=4, out_indices=(9, 14, 19, 23), with_cls_token=True, patch_bias=True,
                 impl="eager", device=None, dtype=None):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by the patch size {patch_size}")
        dd = dict(device=device, dtype=dtype)
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.out_indices = tuple(out_indices)
        if not all(0 <= i < num_layers for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must lie in [0, {num_layers})")
        self.with_cls_token = with_cls_token
        self.patch_embed = PatchEmbed(embed_dims, patch_size, bias=patch_bias, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dims, **dd))
        self.layers = nn.ModuleList(Block(embed_dims, num_heads, mlp_ratio, impl, **dd) for _ in range(num_layers))

    def init_weights(self):
        """mmseg's from-scratch init (jax style): trunc normal .02 for embeddings and Linear
        weights, FFN biases N(0, 1e-6), in_proj as nn.MultiheadAttention, patch conv kaiming."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.kaiming_normal_(self.patch_embed.projection.weight, mode="fan_in", nonlinearity="relu")
        if self.patch_embed.projection.bias is not None:
            nn.init.zeros_(self.patch_embed.projection.bias)
        for block in self.layers:
            block.ln1.reset_parameters()
            block.ln2.reset_parameters()
            attn = block.attn.attn
            nn.init.xavier_uniform_(attn.in_proj_weight)
            nn.init.zeros_(attn.in_proj_bias)
            nn.init.trunc_normal_(attn.out_proj.weight, std=0.02)
            nn.init.zeros_(attn.out_proj.bias)
            for linear in (block.ffn.layers[0][0], block.ffn.layers[1]):
                nn.init.trunc_normal_(linear.weight, std=0.02)
                nn.init.normal_(linear.bias, std=1e-6)

    def tokens(self, x):
        """(B, 3, H, W) -> tokens after patch embed + pos embed (B, [1+] h*w, C), grid (h, w)."""
        x, hw = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = resize_pos_embed(self.pos_embed, self.grid, hw)
        x = x + pos.to(x.dtype)
        if not self.with_cls_token:
            x = x[:, 1:]
        return x, hw

    def forward(self, x):  # (B, 3, H, W) -> [ (B, C, H/16, W/16) for i in out_indices ]
        x, (h, w) = self.tokens(x)
        outs = []
        for i, block in enumerate(self.layers):
            x = block(x)
            if i in self.out_indices:
                out = x[:, 1:] if self.with_cls_token else x
                outs.append(out.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2))
        return outs

    def forward_flops(self, height, width):
        """Multiply-add FLOPs (2 per MAC) of one image's forward pass."""
        h, w = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        n = h * w + (1 if self.with_cls_token else 0)
        C = self.embed_dims
        hidden = self.layers[0].ffn.layers[0][0].out_features
        patch = 2 * h * w * C * 3 * self.patch_size ** 2
        per_block = 2 * n * C * 3 * C + 4 * n * n * C + 2 * n * C * C + 2 * 2 * n * C * hidden
        return patch + len(self.layers) * per_block


def build_vit(name, img_size=512, mla=False, patch_bias=True, impl="eager", device=None, dtype=None):
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(VIT_CONFIGS)}")
    cfg = VIT_CONFIGS[name]
    return VisionTransformer(
        img_size=img_size, embed_dims=cfg["embed_dims"], num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"], out_indices=cfg["mla_out_indices"] if mla else cfg["out_indices"],
        with_cls_token=not mla, patch_bias=patch_bias, impl=impl, device=device, dtype=dtype)
