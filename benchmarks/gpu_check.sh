#!/usr/bin/env bash
# GPU readiness check (issue 16): on a CUDA machine, in about 8 minutes, run
#   1. the DPO and GRPO defaults in bf16-mixed with accel auto and accel off,
#   2. a 1-GPU FSDP DPO run (the configs/trainer/fsdp.yaml overlay, bf16),
#   3. DPO and GRPO on a SmolLM2-135M-shaped model (models/smollm2 when built, else the same architecture with random
#      weights: throughput does not depend on the weights' values),
# and print tokens/s and MFU for each (benchmarks/gpu_report.py). Each run has its own time limit, so one failure
# does not stop the others; the exit code is the number of failed runs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: runs/gpu_check
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same runs for 1 step each on the CPU, FSDP left out (a test)
#
# On a machine without network whose Python lacks jsonargparse (e.g. the `device` tool's GPU machines), carry its
# pure-Python wheels: here `bash benchmarks/gpu_check.sh --wheels` downloads them into .whl/ (git-ignored); there,
# before this script, `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
# export PYTHONPATH=/tmp/site`.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then
  mkdir -p .whl
  for req in jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0; do
    python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      --platform any -d .whl "$req" || exit 1
  done
  ls .whl
  exit 0
fi

OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
failed=0
runs=()
DEVICE=(--trainer.accelerator gpu --trainer.devices 1)
DRY=()
DRY_GEN=()
if [[ -n "${GPU_CHECK_DRY:-}" ]]; then
  DEVICE=(--trainer.accelerator cpu --trainer.devices 1)
  DRY=(--trainer.max_steps 1 --trainer.log_every_n_steps 1)
  DRY_GEN=(--model.init_args.max_new_tokens 8)
fi

[[ -n "${GPU_CHECK_DRY:-}" ]] || python - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")
EOF

# run NAME LIMIT_S ARGS...: one fit, its log and CSV metrics under $OUT/NAME
run() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" python -m src fit "$@" "${DEVICE[@]}" \
      --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "$name" \
      --trainer.enable_progress_bar false --plot.enabled false --hf_export.dirpath null "${DRY[@]}" \
      >"$OUT/$name.log" 2>&1; then
    echo "ok   $name ($((SECONDS - start)) s)"
  else
    echo "FAIL $name ($((SECONDS - start)) s): tail of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
  runs+=("$OUT/$name")
}

BF16=(--config configs/trainer/bf16.yaml)
for accel in auto off; do
  run "dpo_bf16_$accel" 90 --config configs/dpo.yaml "${BF16[@]}" --model.init_args.accel "$accel" --trainer.max_steps 60
  run "grpo_bf16_$accel" 90 --config configs/grpo.yaml "${BF16[@]}" --model.init_args.accel "$accel" \
    --trainer.max_steps 20 "${DRY_GEN[@]}"
done
[[ -n "${GPU_CHECK_DRY:-}" ]] ||  # Lightning refuses FSDP on a CPU
  run dpo_fsdp_1gpu 90 --config configs/dpo.yaml --config configs/trainer/fsdp.yaml "${BF16[@]}" --trainer.max_steps 10

# A SmolLM2-135M-shaped model: the real one when built here, else its architecture with random weights.
SMOL="${SMOLLM2_DIR:-models/smollm2}"
if [[ ! -f "$SMOL/config.json" ]]; then
  SMOL="$OUT/smollm2_shape"
  python - "$SMOL" <<'EOF' || exit 1
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from src.data.tiny import load_tokenizer
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
load_tokenizer().save_pretrained(sys.argv[1])
print(f"built a SmolLM2-135M-shaped model with random weights in {sys.argv[1]}")
EOF
fi
REAL=(--model.init_args.model_name_or_path "$SMOL" --trainer.val_check_interval 1000 --trainer.limit_val_batches 0
  --trainer.callbacks=[] --trainer.enable_checkpointing false)  # no 1.6 GB checkpoint writes
run smollm2_dpo_bf16 120 --config configs/dpo.yaml "${BF16[@]}" "${REAL[@]}" --data.batch_size 16 \
  --trainer.max_steps 20 --model.init_args.optimizer.init_args.lr 1e-6
run smollm2_grpo_bf16 150 --config configs/grpo.yaml "${BF16[@]}" "${REAL[@]}" --data.batch_size 8 \
  --model.init_args.max_new_tokens 128 --trainer.max_steps 5 --model.init_args.optimizer.init_args.lr 1e-6 "${DRY_GEN[@]}"

echo
python benchmarks/gpu_report.py "${runs[@]}"
exit "$failed"
