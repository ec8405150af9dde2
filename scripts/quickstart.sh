#!/usr/bin/env bash
# The README's first command (run by `make quickstart` inside the venv): prepare the built-in
# corpus, train the tiny MoM on 2 CPU ranks with DeepSpeed, evaluate it, sample from it.
# About 5 minutes on 2 cores, no GPU, no internet.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA=data/builtin
RUN=runs/tiny
RANKS="${RANKS:-2}"

if [ ! -f "$DATA/meta.json" ]; then
  echo "== 1/4 prepare the built-in corpus (Python stdlib source, byte tokens) -> $DATA"
  mom-prep --source builtin --tokenizer bytes --out "$DATA"
else
  echo "== 1/4 $DATA is prepared already"
fi

echo "== 2/4 train configs/tiny.yaml on $RANKS CPU ranks (deepspeed launcher, gloo, ZeRO-1)"
# --overwrite: a fresh run each time; `mom-train ... --resume` continues one instead
deepspeed --num_accelerators "$RANKS" "$(command -v mom-train)" --config configs/tiny.yaml \
  --data.data_dir "$DATA" --train.out_dir "$RUN" --overwrite 2>&1 | grep -v '^\[20' || {
  echo "quickstart: training failed (see the output above)"; exit 1; }
[ -f "$RUN/ckpt/latest" ] || { echo "quickstart: training wrote no checkpoint"; exit 1; }

echo "== 3/4 evaluate the final checkpoint"
mom-eval "$RUN" 2>&1 | tail -1

echo "== 4/4 sample from it"
mom-generate "$RUN" --prompt "def __init__(self" --max-new-tokens 160 --temperature 0.7 \
  2>/dev/null | grep -v -e '^Parsing checkpoint' -e '^Processing zero' -e '^Detected checkpoint' -e '^Reconstructed'

echo
echo "TensorBoard: tensorboard --logdir $RUN/tb"
