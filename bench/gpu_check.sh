#!/usr/bin/env bash
# One GPU run in at most 8 minutes (bench/gpu_check.py); arguments are passed on, e.g. --dry-run.
cd "$(dirname "$0")/.." && PYTHONPATH=. exec python3 bench/gpu_check.py "$@"
