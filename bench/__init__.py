"""Benchmarks: kernels, the training step, planned and measured memory, the one-GPU check.

What every bench script shares without importing torch (so that `--help` and a bad flag answer
at once): the name of our implementation, GiB, and how a user's mistake ends a script.
"""
import os
import sys

OURS = "triton"  # our Triton kernels (impl="triton"): the provider / variant name of ours everywhere
GIB = 2 ** 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class UsageError(ValueError):
    """A user's mistake (a flag value, a missing or foreign file); the message names it and what
    was expected."""


def run_script(main, argv=None):
    """main(argv) as a script's exit status: a UsageError is one line on stderr and status 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
