#!/usr/bin/env bash
# Launch SETR training on this node through setr-train (train/launch.py: torchrun with the exit
# status of the rank that failed first and no launcher traceback); extra arguments go to train/main.py.
#
#   ./run_train.sh --head pup --data-root /data/ADEChallengeData2016 --pretrained vit_large_p16_384.pth
#   NGPU=1 ./run_train.sh --head mla --preset mla_b8 --data-root ...
#   LOG_RANK=0,1 ./run_train.sh --head pup --dataset synthetic        # console output of ranks 0 and 1
#   MAX_RESTARTS=3 ./run_train.sh --head pup --data-root ... --resume auto   # survive 3 failed ranks
#
# Multi-node: run on every node with NNODES=<nodes> RDZV_ENDPOINT=<host of node 0>:29500
# (c10d rendezvous; the --work-dir must be on storage all nodes share), and LOCAL_ADDR=<this node's
# address> where hostnames do not resolve between the nodes (torchrun's --local_addr: the ranks
# reach the store of the job's node 0 at that node's address, else at its hostname).
set -euo pipefail
LAUNCH="$(dirname "$0")/train/launch.py"  # relative paths in the arguments stay relative to the caller

if [ -z "${NGPU:-}" ]; then
    NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 2)")  # no GPU: 2 CPU processes
fi
NNODES=${NNODES:-1}
export LOG_RANK=${LOG_RANK:-0}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}

if [ "$NNODES" -gt 1 ]; then
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (node 0) for a multi-node run}"
    exec python "$LAUNCH" --nnodes="$NNODES" --nproc_per_node="$NGPU" --max-restarts="${MAX_RESTARTS:-0}" \
        --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-setr}" \
        ${LOCAL_ADDR:+--local_addr="$LOCAL_ADDR"} "$@"
fi
exec python "$LAUNCH" --standalone --nproc_per_node="$NGPU" --max-restarts="${MAX_RESTARTS:-0}" "$@"
