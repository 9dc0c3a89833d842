"""The names and sizes the whole engine agrees on, in a module that imports nothing: the command
lines offer them as choices (and answer `--help`) before torch is imported.

The dataset names are setr.data.datasets.DATASETS (torch-free too, next to build_dataset).
"""

PATCH_SIZE = 16  # ViT patch side: crops, slide windows and img_size are multiples of it

# embed_dims, num_layers, num_heads, out_indices (naive/pup and mla), head channels
VIT_CONFIGS = {
    "vit_large": dict(embed_dims=1024, num_layers=24, num_heads=16,
                      out_indices=(9, 14, 19, 23), mla_out_indices=(5, 11, 17, 23), head_channels=256),
    "vit_base": dict(embed_dims=768, num_layers=12, num_heads=12,
                     out_indices=(3, 5, 7, 11), mla_out_indices=(2, 5, 8, 11), head_channels=256),
    # tests and the CPU demo; head dim 32 so the attention kernel runs it too
    "vit_tiny": dict(embed_dims=128, num_layers=4, num_heads=4,
                     out_indices=(0, 1, 2, 3), mla_out_indices=(0, 1, 2, 3), head_channels=32),
}
BACKBONES = tuple(VIT_CONFIGS)  # vit_large, vit_base, vit_tiny
HEADS = ("naive", "pup", "mla")
IMPLS = ("eager", "sdpa", "triton")  # op implementations, see setr/layers.py
MODEL_RECOMPUTE = ("none", "selective")  # what the model does itself (SETR.set_recompute)
RECOMPUTE = MODEL_RECOMPUTE + ("full",)  # training's memory policies (train.parallelize.apply_recompute)
