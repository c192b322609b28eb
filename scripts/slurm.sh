#!/usr/bin/env bash
# Multi-node training under SLURM with Lightning's own SLURMEnvironment (no home-made launcher): one task per GPU,
# `srun` starts them and Lightning reads the rank/world from SLURM variables.
#   sbatch scripts/slurm.sh configs/dpo.yaml --config configs/trainer/fsdp.yaml --config configs/trainer/bf16.yaml
#SBATCH --job-name=align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm.sh CONFIG [more CLI args]}
shift
export WANDB_MODE=${WANDB_MODE:-offline}
srun python -m src fit --config "$CONFIG" \
  --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" "$@"
