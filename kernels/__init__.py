"""Our Triton kernels, each with its autograd.Function and a plain-PyTorch reference."""
from kernels.attention import attention, attention_qkv_packed, attention_reference
from kernels.layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from kernels.upsample import upsample_bilinear, upsample_bilinear_reference
from kernels.upsample_cross_entropy import upsample_cross_entropy, upsample_cross_entropy_reference

__all__ = [
    "attention", "attention_qkv_packed", "attention_reference",
    "layer_norm", "layer_norm_reference", "add_layer_norm", "add_layer_norm_reference",
    "upsample_bilinear", "upsample_bilinear_reference",
    "upsample_cross_entropy", "upsample_cross_entropy_reference",
]
