#!/usr/bin/env bash
# Multi-node training with torchrun (Lightning's TorchElasticEnvironment picks up the rank/world it sets).
# Run on every node, e.g. 2 nodes x 8 GPUs:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun.sh configs/grpo.yaml --config configs/trainer/ddp.yaml
set -euo pipefail
CONFIG=${1:?usage: scripts/torchrun.sh CONFIG [more CLI args]}
shift
NNODES=${NNODES:-1}
NPROC=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m src fit --config "$CONFIG" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" "$@"
