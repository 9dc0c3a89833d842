"""SETR: ViT backbone + (MLA neck) + decode head + auxiliary heads, as mmseg's EncoderDecoder.

model.eval(); model(images) -> logits at the input resolution (mmseg's encode_decode).
model.train(); model(images, labels) -> {"decode": loss, "aux0": 0.4 * loss, ...}.
Images arrive normalized and padded by the data pipeline; forward does neither.

Memory policy is separate from impl: recompute="selective" (build_setr, or set_recompute) makes
the backward recompute cheap intermediates instead of keeping them, for every impl, with the same
gradients. Checkpointing whole blocks is a training setting (train.parallelize, --recompute full).
"""
import torch.nn as nn

from setr import layers
from setr.constants import BACKBONES, HEADS, MODEL_RECOMPUTE, VIT_CONFIGS
from setr.heads import ClassifierHead, MLANeck, SETRMLAHead, SETRUPHead
from setr.vit import Block, build_vit

AUX_WEIGHT = 0.4


class SETR(nn.Module):
    def __init__(self, head="pup", backbone="vit_large", num_classes=150, img_size=512, impl="eager",
                 aux=True, patch_bias=True, ignore_index=255, aux_num_convs=2, recompute="none", device=None,
                 dtype=None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if aux_num_convs not in (1, 2):
            raise ValueError(f"aux_num_convs must be 1 or 2 (mmseg's SETR configs), got {aux_num_convs}")
        self.impl = layers.resolve_impl(impl)
        self.head = head
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.config = dict(head=head, backbone=backbone, num_classes=num_classes,
                           img_size=img_size if isinstance(img_size, int) else list(img_size),
                           patch_bias=patch_bias, ignore_index=ignore_index, aux_num_convs=aux_num_convs)
        dd = dict(device=device, dtype=dtype)
        cfg = VIT_CONFIGS[backbone]
        width, channels = cfg["embed_dims"], cfg["head_channels"]
        # Classify before the last upsample when the loss and upsample are our fused kernels.
        classify_first = self.impl["loss"] == "triton"
        self.backbone = build_vit(backbone, img_size, mla=head == "mla", patch_bias=patch_bias,
                                  impl=self.impl, **dd)
        head_kw = dict(classify_first=classify_first, impl=self.impl, **dd)
        if head == "mla":
            self.neck = MLANeck([width] * 4, channels, impl=self.impl, **dd)
            self.decode_head = SETRMLAHead([channels] * 4, channels // 2, num_classes, **head_kw)
            aux_heads = [ClassifierHead(channels, num_classes, i, **dd) for i in range(4)] if aux else []
        else:
            self.neck = None
            num_convs, up_scale, kernel = (1, 4, 1) if head == "naive" else (4, 2, 3)
            self.decode_head = SETRUPHead(width, channels, num_classes, num_convs, up_scale, kernel,
                                          in_index=3, **head_kw)
            aux_heads = [SETRUPHead(width, channels, num_classes, num_convs=aux_num_convs, up_scale=4,
                                    kernel_size=1 if head == "naive" else 3, in_index=i, **head_kw)
                         for i in range(3)] if aux else []
        self.auxiliary_head = nn.ModuleList(aux_heads)
        self.set_recompute(recompute)
        self.init_weights()

    def set_recompute(self, policy):
        """"none" keeps for the backward what autograd keeps; "selective" recomputes there, instead
        of keeping them, each ViT block's GELU output and pre-attention LayerNorm output and the
        Naive / PUP heads' upsampled conv inputs (elementwise ops and resizes, re-run on the kept
        inputs: the gradients do not change). Call it before checkpointing whole blocks."""
        if policy not in MODEL_RECOMPUTE:
            raise ValueError(f"recompute {policy!r}; expected one of {MODEL_RECOMPUTE}")
        for m in self.modules():
            if isinstance(m, (Block, SETRUPHead)):
                m.recompute = policy == "selective"

    def init_weights(self):
        """Initialize every parameter and buffer (also after `to_empty` from the meta device)."""
        self.backbone.init_weights()
        for m in [self.neck, self.decode_head, *self.auxiliary_head]:
            if m is not None:
                m.reset_parameters()

    def features(self, images):
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    def forward(self, images, labels=None):
        if labels is None:
            return self.predict_logits(images)
        return self.losses(images, labels)

    def predict_logits(self, images):  # (B, 3, H, W) -> (B, K, H, W)
        logits, out_size = self.decode_head(self.features(images))
        logits = layers.upsample(logits, out_size, self.impl["upsample"])
        return layers.upsample(logits, images.shape[-2:], self.impl["upsample"])

    def losses(self, images, labels):
        """Loss terms, already weighted (decode 1.0, each aux 0.4). labels: (B, H, W) int64."""
        if labels.dim() != 3 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (B, H, W) with B={images.shape[0]}, got {tuple(labels.shape)}")
        feats = self.features(images)
        losses = {"decode": self.head_loss(self.decode_head(feats), labels)}
        for i, aux in enumerate(self.auxiliary_head):
            losses[f"aux{i}"] = AUX_WEIGHT * self.head_loss(aux(feats), labels)
        return losses

    def head_loss(self, head_output, labels):
        logits, out_size = head_output
        label_size = tuple(labels.shape[-2:])
        if tuple(logits.shape[-2:]) != out_size and out_size != label_size:
            # the head's own last upsample does not land on the label size: apply it first
            logits = layers.upsample(logits, out_size, self.impl["upsample"])
        return layers.seg_loss(logits, labels, self.ignore_index, self.impl["loss"])

    def forward_flops(self, height, width):
        """Analytic FLOPs (2 per multiply-add) of one image's training forward, aux heads
        included (convolutions and matmuls; norms, activations and resizes are not counted)."""
        p = self.backbone.patch_size
        grid = (-(-height // p), -(-width // p))
        heads = [m for m in [self.neck, self.decode_head, *self.auxiliary_head] if m is not None]
        return self.backbone.forward_flops(height, width) + sum(m.flops(grid) for m in heads)


def build_setr(head, backbone="vit_large", num_classes=150, img_size=512, impl="eager", aux=True,
               patch_bias=True, ignore_index=255, aux_num_convs=2, recompute="none", device=None, dtype=None):
    """Build SETR-Naive / PUP / MLA as mmseg's ADE20K configs do.

    head: one of HEADS; backbone: one of BACKBONES; impl: one of setr.constants.IMPLS or a per-op
    dict (the table in setr.layers says what runs). aux_num_convs: conv stages of the Naive / PUP
    auxiliary heads, 2 in every config but mmseg's Naive Cityscapes one (1: it keeps the base
    model's auxiliary heads). img_size: the pos-embed grid (768 for the Cityscapes checkpoints).
    recompute: one of MODEL_RECOMPUTE (SETR.set_recompute).
    """
    return SETR(head, backbone, num_classes, img_size, impl, aux, patch_bias, ignore_index, aux_num_convs,
                recompute, device, dtype)
