"""SETR decode heads, the MLA neck and the auxiliary heads, as mmsegmentation builds them.

Every head returns `(logits, out_size)`: the logits mmseg's head would return are
`upsample(logits, out_size)`. With `classify_first=False` (mmseg's order) the logits are
already at out_size. With `classify_first=True` the 1x1 classifier runs before the head's last
bilinear upsample, which is exact algebra (a 1x1 conv is linear per pixel, bilinear
interpolation is linear per channel with weights summing to 1, so even the bias commutes) and
lets the loss upsample and score the logits in one fused pass, never storing them at full size.
Module names mirror mmseg's state dict (`up_convs.k.0.conv`, `conv_seg`, `neck.mla.*`).
"""
import torch
import torch.nn as nn

from setr import layers
from setr.vit import recompute_cheap


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, mmcv's ConvModule with a norm. mmseg uses SyncBN;
    the training code converts these BatchNorms to synchronized ones."""

    def __init__(self, in_channels, out_channels, kernel_size, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                              bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, device=device, dtype=dtype)
        self.activate = nn.ReLU(inplace=True)

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()

    def forward(self, x, upsample=None):
        """upsample: an Upsample applied to x first and run again in the backward, so that only x,
        not the 4x (x2) or 16x (x4) larger upsampled map, is kept for the conv's backward."""
        x = self.conv(x) if upsample is None else recompute_cheap(lambda t: self.conv(upsample(t)), x)
        return self.activate(self.bn(x))


class Upsample(nn.Module):
    """mmseg's Upsample: bilinear to int(size * scale), align_corners=False."""

    def __init__(self, scale_factor, impl="eager"):
        super().__init__()
        self.scale_factor = scale_factor
        self.impl = impl

    def out_size(self, hw):
        return tuple(int(s * self.scale_factor) for s in hw)

    def forward(self, x):
        return layers.upsample(x, self.out_size(x.shape[-2:]), self.impl)


def conv_flops(conv, hw):
    """2 * MACs of a conv producing an hw-sized map (stride 1, 'same' padding)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * hw[0] * hw[1] * conv.in_channels * conv.out_channels * k


def init_conv_seg(conv):
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


def tokens_layer_norm(norm, x):
    """LayerNorm over channels of an NCHW map (mmseg flattens to tokens and back)."""
    n, c, h, w = x.shape
    x = norm(x.flatten(2).transpose(1, 2))  # (n, hw, c)
    return x.transpose(1, 2).reshape(n, c, h, w)


class SETRUPHead(nn.Module):
    """LN -> num_convs x [ConvModule(k) -> Upsample(up_scale)] -> conv_seg (1x1).

    Naive decode: 1 conv 1x1, up x4. PUP decode: 4 conv 3x3, up x2 each.
    Naive/PUP auxiliary heads: 2 convs (1x1 / 3x3; 1 conv in the Naive Cityscapes config), up x4 each.
    """

    def __init__(self, in_channels, channels, num_classes, num_convs, up_scale, kernel_size,
                 in_index, classify_first=False, impl=None, device=None, dtype=None):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        impl = layers.resolve_impl(impl or "eager")
        dd = dict(device=device, dtype=dtype)
        self.in_index = in_index
        self.classify_first = classify_first
        self.recompute = False  # SETR.set_recompute: the convs' upsampled inputs are recomputed
        self.conv_seg = nn.Conv2d(channels, num_classes, 1, **dd)
        self.norm = layers.LayerNorm(in_channels, eps=1e-6, impl=impl["layer_norm"], **dd)
        self.up_convs = nn.ModuleList()
        for i in range(num_convs):
            self.up_convs.append(nn.Sequential(
                ConvModule(in_channels if i == 0 else channels, channels, kernel_size, **dd),
                Upsample(up_scale, impl["upsample"])))

    def reset_parameters(self):
        init_conv_seg(self.conv_seg)
        self.norm.reset_parameters()
        for up_conv in self.up_convs:
            up_conv[0].reset_parameters()

    def flops(self, hw):
        total = 0
        for conv, up in self.up_convs:
            total += conv_flops(conv.conv, hw)
            pre_up, hw = hw, up.out_size(hw)
        return total + conv_flops(self.conv_seg, pre_up if self.classify_first else hw)

    def forward(self, inputs):  # list of (B, C, h, w) -> (B, K, h', w'), out_size
        x = tokens_layer_norm(self.norm, inputs[self.in_index])
        pending = None  # recompute: an upsample left to the next conv, which keeps only its smaller input
        for conv, up in self.up_convs[:-1]:
            x = conv(x, upsample=pending)
            if self.recompute:
                pending = up
            else:
                x = up(x)
        conv, up = self.up_convs[-1]
        x = conv(x, upsample=pending)
        out_size = up.out_size(x.shape[-2:])
        if self.classify_first:
            return self.conv_seg(x), out_size
        return self.conv_seg(up(x)), out_size


class MLANeck(nn.Module):
    """Per-input LN -> 1x1 ConvModule to 256 -> top-down cumulative sum from the deepest ->
    3x3 ConvModule. Output j sums the j+1 deepest inputs: output 0 is the deepest alone."""

    def __init__(self, in_channels, out_channels=256, impl=None, device=None, dtype=None):
        super().__init__()
        impl = layers.resolve_impl(impl or "eager")
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.ModuleList(layers.LayerNorm(c, eps=1e-6, impl=impl["layer_norm"], **dd) for c in in_channels)
        self.mla = nn.Module()
        self.mla.channel_proj = nn.ModuleList(ConvModule(c, out_channels, 1, **dd) for c in in_channels)
        self.mla.feat_extract = nn.ModuleList(ConvModule(out_channels, out_channels, 3, **dd) for _ in in_channels)

    def reset_parameters(self):
        for m in self.norm:
            m.reset_parameters()
        for m in list(self.mla.channel_proj) + list(self.mla.feat_extract):
            m.reset_parameters()

    def flops(self, hw):
        return sum(conv_flops(m.conv, hw) for m in list(self.mla.channel_proj) + list(self.mla.feat_extract))

    def forward(self, inputs):  # 4 x (B, C, h, w) -> 4 x (B, 256, h, w)
        projected = [proj(tokens_layer_norm(norm, x))
                     for norm, proj, x in zip(self.norm, self.mla.channel_proj, inputs)]
        summed = [projected[-1]]
        for p in reversed(projected[:-1]):
            summed.append(summed[-1] + p)
        return [extract(m) for extract, m in zip(self.mla.feat_extract, summed)]


class SETRMLAHead(nn.Module):
    """For each neck output: 2 x ConvModule 3x3 -> up x4; concat (4 x mla_channels) -> conv_seg."""

    def __init__(self, in_channels, mla_channels, num_classes, up_scale=4, classify_first=False,
                 impl=None, device=None, dtype=None):
        super().__init__()
        impl = layers.resolve_impl(impl or "eager")
        dd = dict(device=device, dtype=dtype)
        self.classify_first = classify_first
        self.conv_seg = nn.Conv2d(len(in_channels) * mla_channels, num_classes, 1, **dd)
        self.up_convs = nn.ModuleList(nn.Sequential(
            ConvModule(c, mla_channels, 3, **dd),
            ConvModule(mla_channels, mla_channels, 3, **dd),
            Upsample(up_scale, impl["upsample"])) for c in in_channels)

    def reset_parameters(self):
        init_conv_seg(self.conv_seg)
        for up_conv in self.up_convs:
            up_conv[0].reset_parameters()
            up_conv[1].reset_parameters()

    def flops(self, hw):
        total = sum(conv_flops(up_conv[0].conv, hw) + conv_flops(up_conv[1].conv, hw) for up_conv in self.up_convs)
        return total + conv_flops(self.conv_seg, hw if self.classify_first else self.up_convs[0][2].out_size(hw))

    def forward(self, inputs):  # 4 x (B, 256, h, w) -> (B, K, 4h, 4w) | (B, K, h, w), out_size
        feats = [up_conv[1](up_conv[0](x)) for up_conv, x in zip(self.up_convs, inputs)]
        up = self.up_convs[-1][2]
        out_size = up.out_size(feats[0].shape[-2:])
        if self.classify_first:  # every branch shares one upsample, so it commutes with concat too
            return self.conv_seg(torch.cat(feats, dim=1)), out_size
        return self.conv_seg(torch.cat([up(f) for f in feats], dim=1)), out_size


class ClassifierHead(nn.Module):
    """mmseg's FCNHead with num_convs=0 (MLA auxiliary heads): only conv_seg 1x1 on input i."""

    def __init__(self, in_channels, num_classes, in_index, device=None, dtype=None):
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1, device=device, dtype=dtype)

    def reset_parameters(self):
        init_conv_seg(self.conv_seg)

    def flops(self, hw):
        return conv_flops(self.conv_seg, hw)

    def forward(self, inputs):
        x = self.conv_seg(inputs[self.in_index])
        return x, tuple(x.shape[-2:])
