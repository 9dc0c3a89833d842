"""SETR (Zheng et al. 2021) as mmsegmentation builds it, with our Triton kernels on the hot paths."""
from setr.model import HEADS, SETR, build_setr
from setr.weights import export_model, load_mmseg_checkpoint, load_timm_vit, read_checkpoint_meta

__all__ = ["HEADS", "SETR", "build_setr", "export_model", "load_mmseg_checkpoint", "load_timm_vit",
           "read_checkpoint_meta"]
