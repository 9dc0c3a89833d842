# Our Triton kernels (the model's impl="triton"): the provider / variant name of ours in every
# benchmark. Here rather than in bench/common.py so that bench/readme_tables.py needs no torch.
OURS = "triton"
