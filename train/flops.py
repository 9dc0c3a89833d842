"""Peak dense FLOP/s per GPU and model FLOPs utilization (MFU), for training logs and bench/."""

# Dense (no sparsity) peak FLOP/s per device by name (substring, first match wins) and compute
# dtype.
PEAK_FLOPS = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H20", {"bf16": 148e12, "fp16": 148e12, "fp32": 44e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
]


def peak_flops(device_name, precision):
    """Peak dense FLOP/s of a GPU named like torch.cuda.get_device_name() for precision
    'bf16' | 'fp16' | 'fp32'; None for an unknown GPU or no name (CPU)."""
    for key, table in PEAK_FLOPS:
        if device_name and key in device_name:
            return table[precision]
    return None


def model_flops_utilization(flops_per_image, images_per_s, peak, num_gpus=1):
    """Achieved / peak FLOP/s over num_gpus GPUs; None when the peak is unknown."""
    return flops_per_image * images_per_s / (peak * num_gpus) if peak else None
