#!/usr/bin/env bash
# Issue 10 part 3: coprocessors trained with latents 0..D tokens late (D = 0 and D = 3) on one small CPU budget,
# then Table 1 with latents arriving d = 0..3 tokens late, collected into results/delay/fixed*/delay.md.
#
#   nohup scripts/delay_study.sh > runs/delay.log 2>&1 &
#
# Resumable: finished runs are skipped by dca train's own resume (same --out, same arguments).
set -euo pipefail
export OMP_NUM_THREADS=1
DCA=${DCA:-.venv/bin/dca}
COMMON=(--model smollm2-135m --data wiki --seq-len 128 --positions 8 --batch-size 4 --steps 150 --bf16
        --num-latents 8 --num-ahead 8 --lora-rank 16 --lr 1e-3 --warmup-steps 15
        --eval-every 150 --eval-sequences 32 --save-every 25 --no-progress)
for D in 0 3; do  # the two runs may also go side by side, one process each
  $DCA train "${COMMON[@]}" --max-delay "$D" --out runs/delay/d$D
done
# Late latents sit on the anchor of their insertion point since the fix after commit 482bb02 (the numbers from
# before it are in results/delay/before-fix). runs/delay/d3 was trained before the fix (its late groups replayed
# x[t-N+1 .. t]) and dca train's resume does not know: delete it to retrain it with the fixed anchor.
# results/delay/fixed-d3 holds that run evaluated with the fixed anchor; the retrained one is in fixed-d3-retrained.
EVAL=(--model smollm2-135m --data wiki --sequences 64 --seq-len 128 --positions 8 --ks 1 2 3 4 5 6 7 8)
for d in 0 1 2 3; do  # the D = 0 coprocessor and its configuration untrained; the four delays may run side by side
  $DCA eval --coprocessors runs/delay/d0/adapter "${EVAL[@]}" --latent-delay "$d" --out results/delay/fixed/eval-d$d
done
for d in 0 1 2 3; do
  $DCA eval --coprocessors runs/delay/d3/adapter "${EVAL[@]}" --no-untrained --latent-delay "$d" \
      --out results/delay/fixed-d3-retrained/eval-d$d
done
.venv/bin/python scripts/delay_report.py results/delay/fixed
.venv/bin/python scripts/delay_report.py results/delay/fixed-d3-retrained
