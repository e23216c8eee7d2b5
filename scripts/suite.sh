#!/usr/bin/env bash
# The RESULTS.md suite (issue 4): every coprocessor variant and the pause-token baseline, trained by
# `dca train` on the same data, order and budget, then scored side by side by `dca eval`.
#
#   scripts/suite.sh [RUNS_DIR] [REPORT_DIR]        (defaults: runs/suite results/suite)
#
# Resumable: run it again and finished runs are skipped, interrupted ones resume from their checkpoint.
# Sized by STEPS (optimiser steps per run, default 250) and LIMIT (items per benchmark, default 250);
# meant for a GPU (bf16 autocast), works anywhere. DCA="python -m dca.cli" overrides the command.
# PRESET=paper trains every coprocessor as the paper's literal method (issue 11; pause tokens are unchanged) and
# SEED another data order and other insertion points: give each its own folders, e.g.
#   PRESET=paper SEED=1 scripts/suite.sh runs/suite-paper-s1 results/suite-paper-s1
set -euo pipefail
RUNS=${1:-runs/suite}
REPORT=${2:-results/suite}
DCA=${DCA:-.venv/bin/dca}
STEPS=${STEPS:-250}
LIMIT=${LIMIT:-250}
GSM8K_LIMIT=${GSM8K_LIMIT:-200}
MODEL=${MODEL:-smollm2-135m}
PRESET=${PRESET:-dca}
SEED=${SEED:-0}
mkdir -p "$RUNS" "$REPORT"

# One budget for all: 16 sequences x 256 tokens per step, 16 augmentation points per sequence.
COMMON=(--model "$MODEL" --data wiki --seq-len 256 --positions 16 --batch-size 16 --steps "$STEPS"
        --warmup-steps 25 --eval-every "$STEPS" --eval-sequences 64 --save-every 50 --no-progress --seed "$SEED")

run() {  # run NAME ARGS...: train unless its adapter exists
  local name=$1; shift
  if [[ -f $RUNS/$name/adapter/dca_config.json ]]; then echo "== $name: done"; return; fi
  echo "== $name: $DCA train ${COMMON[*]} --out $RUNS/$name $*"
  $DCA train "${COMMON[@]}" --out "$RUNS/$name" "$@" 2>&1 | tee -a "$RUNS/$name.log" || echo "== $name: FAILED"
}

adapters() {  # adapters RUN_NAMES...: the finished ones' adapter folders
  for r in "$@"; do [[ -f $RUNS/$r/adapter/dca_config.json ]] && echo "$RUNS/$r/adapter"; done; true
}

score() {  # score REPORT_NAME RUN_NAMES...: Table 1 and the multiple-choice benchmarks
  local name=$1; shift
  $DCA eval --model "$MODEL" --coprocessors $(adapters "$@") --sequences 64 --positions 8 --batch-size 32 \
    --limit "$LIMIT" --benchmarks arc_easy arc_challenge hellaswag piqa winogrande mmlu --out "$REPORT/$name" \
    || echo "== eval $name: FAILED"
}

LORA=(--preset "$PRESET" --lora-rank 16 --lr 1e-3)
# Latent sweep (Tables 1-2) and the pause-token baseline at the same latent count (Table 3)
run lora16-n16 "${LORA[@]}" --num-latents 16 --num-ahead 16
run pause-n16 --method pause --lr 1e-3 --num-latents 16 --num-ahead 16
run lora16-n4 "${LORA[@]}" --num-latents 4 --num-ahead 16
run lora16-n64 "${LORA[@]}" --num-latents 64 --num-ahead 16
score latents lora16-n4 lora16-n16 lora16-n64 pause-n16

# Coprocessor training (Table 5) and ahead tokens (Table 6), all at 16 latents
run full-n16 --preset "$PRESET" --lr 1e-4 --num-latents 16 --num-ahead 16
run lora64-n16 --preset "$PRESET" --lora-rank 64 --lr 1e-3 --num-latents 16 --num-ahead 16
run scratch-n16 --preset "$PRESET" --init scratch --lr 3e-4 --num-latents 16 --num-ahead 16
run lora16-n16-a4 "${LORA[@]}" --num-latents 16 --num-ahead 4
score variants lora16-n16 full-n16 lora64-n16 scratch-n16 lora16-n16-a4

# GSM8K 8-shot (Table 2) and zero-shot chain of thought (Table 4)
$DCA eval --model "$MODEL" --coprocessors $(adapters lora16-n16 lora16-n64 full-n16 pause-n16) --sequences 0 \
  --batch-size 64 --limit "$GSM8K_LIMIT" --benchmarks gsm8k gsm8k_cot0 --out "$REPORT/gsm8k" || echo "== gsm8k: FAILED"
echo "== suite done"
