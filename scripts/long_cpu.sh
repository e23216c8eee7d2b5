#!/usr/bin/env bash
# Issue 11 item 7 without a GPU: the longest resumable CPU run that fits one session -- dca's coprocessor
# (LoRA 16, N = 16; "replay", the default then, and "overwrite", the default since) against pause tokens (N = 16)
# on one budget (same data, order, steps),
# then Table 1 on the training corpus (wiki, its 5 % held-out split) and on a second, unlike corpus (owt, never
# trained on: a 20 % split, since 5 % of it holds fewer than 64 sequences).
#
#   OMP_NUM_THREADS=1 nohup scripts/long_cpu.sh > runs/long-cpu.log 2>&1 &
#
# It ends with the overwrite run, pause tokens and the paper preset at four times the budget (1200 steps, in RUNS-1200).
# Resumable: run it again and finished runs are skipped, interrupted ones resume from their checkpoint.
# bf16 autocast on the CPU (AVX-512 bf16); one thread, so the machine stays usable beside it.
set -euo pipefail
RUNS=${1:-runs/long-cpu}
REPORT=${2:-results/long-cpu}
DCA=${DCA:-.venv/bin/dca}
STEPS=${STEPS:-300}
mkdir -p "$RUNS" "$REPORT"

COMMON=(--model smollm2-135m --data wiki --seq-len 128 --positions 8 --batch-size 4 --bf16
        --warmup-steps 30 --eval-every 150 --eval-sequences 32 --save-every 25 --no-progress
        --num-latents 16 --num-ahead 16 --lr 1e-3)

run() {  # run NAME ARGS...: train unless its adapter exists (STEPS and RUNS as set when called)
  local name=$1; shift
  if [[ -f $RUNS/$name/adapter/dca_config.json ]]; then echo "== $name: done"; return; fi
  echo "== $name: $DCA train ${COMMON[*]} --steps $STEPS --out $RUNS/$name $* ($(date -u +%H:%M))"
  $DCA train "${COMMON[@]}" --steps "$STEPS" --out "$RUNS/$name" "$@"
}

# side by side, one thread each (logs beside the run folders); the paper preset (issue 11, item 1) at the same
# budget was added a session later, and is scored on its own below (the base perplexities are the same)
run default-n16 --lora-rank 16 --latent-positions replay >> "$RUNS/default-n16.log" 2>&1 &  # the default then
run pause-n16 --method pause >> "$RUNS/pause-n16.log" 2>&1 &
run paper-n16 --preset paper --lora-rank 16 >> "$RUNS/paper-n16.log" 2>&1 &
run overwrite-n16 --lora-rank 16 --latent-positions overwrite >> "$RUNS/overwrite-n16.log" 2>&1 &  # session 6
wait
# both corpora side by side; the untrained column is left out (init-study gives it for N = 16)
for split in wiki:0.05 owt:0.2; do
  data=${split%:*}
  [[ -f $REPORT/$data/eval.json ]] && { echo "== eval on $data: done"; continue; }
  echo "== eval on $data ($(date -u +%H:%M))"
  $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" --no-untrained \
    --coprocessors "$RUNS/default-n16/adapter" "$RUNS/pause-n16/adapter" \
    --sequences 64 --positions 8 --batch-size 16 --out "$REPORT/$data" > "$RUNS/eval-$data.log" 2>&1 &
done
wait
for split in wiki:0.05 owt:0.2; do
  data=${split%:*}
  [[ -f $REPORT/paper/$data/eval.json ]] && continue
  echo "== paper preset, eval on $data ($(date -u +%H:%M))"
  $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" \
    --coprocessors "$RUNS/paper-n16/adapter" \
    --sequences 64 --positions 8 --batch-size 16 --out "$REPORT/paper/$data" > "$RUNS/eval-paper-$data.log" 2>&1
done
# "overwrite" needs N tokens before each point: all four side by side at points t >= 15 (other points than above)
for split in wiki:0.05 owt:0.2; do
  data=${split%:*}
  [[ -f $REPORT/overwrite/$data/eval.json ]] && continue
  echo "== all four at t >= 15, eval on $data ($(date -u +%H:%M))"
  $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" --no-untrained \
    --coprocessors "$RUNS/overwrite-n16/adapter" "$RUNS/default-n16/adapter" "$RUNS/pause-n16/adapter" \
    "$RUNS/paper-n16/adapter" --sequences 64 --positions 8 --batch-size 16 --out "$REPORT/overwrite/$data" \
    > "$RUNS/eval-overwrite-$data.log" 2>&1 &
done
wait
# session 7: the overwrite run and pause tokens at four times the budget (1200 steps, 614k tokens), side by side,
# then both at t >= 15 on both corpora, on the points above (seed 12345) and on a second draw (--point-seed 1)
RUNS=${RUNS}-1200 STEPS=1200
mkdir -p "$RUNS"
run overwrite-n16 --lora-rank 16 --latent-positions overwrite >> "$RUNS/overwrite-n16.log" 2>&1 &
run pause-n16 --method pause >> "$RUNS/pause-n16.log" 2>&1 &
wait
for draw in 12345 1; do
  for split in wiki:0.05 owt:0.2; do
    data=${split%:*}
    out=$REPORT/budget-1200/points-$draw/$data
    [[ -f $out/eval.json ]] && continue
    echo "== 1200 steps, eval on $data, points $draw ($(date -u +%H:%M))"
    $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" --no-untrained \
      --coprocessors "$RUNS/overwrite-n16/adapter" "$RUNS/pause-n16/adapter" --sequences 64 --positions 8 \
      --min-position 15 --point-seed $draw --batch-size 16 --out "$out" > "$RUNS/eval-$data-$draw.log" 2>&1 &
  done
  wait
done
# session 8: the paper preset at the same 1200-step budget (issue 11, item 1: a paper row in every table), alone,
# scored on both draws of points; then all three on more sequences: wiki 192 (nearly all of its 5 % split) and
# owt 384 (a 90 % split: it was never trained on), for intervals about half as wide
run paper-n16 --preset paper --lora-rank 16 >> "$RUNS/paper-n16.log" 2>&1
for draw in 12345 1; do
  for split in wiki:0.05 owt:0.2; do
    data=${split%:*}
    out=$REPORT/budget-1200/points-$draw/paper-$data
    [[ -f $out/eval.json ]] && continue
    echo "== 1200 steps, paper preset, eval on $data, points $draw ($(date -u +%H:%M))"
    $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" --no-untrained \
      --coprocessors "$RUNS/paper-n16/adapter" --sequences 64 --positions 8 --min-position 15 --point-seed $draw \
      --batch-size 16 --out "$out" > "$RUNS/eval-paper-$data-$draw.log" 2>&1 &
  done
  wait
done
for group in both paper; do  # overwrite and pause tokens, then the paper preset (base perplexities agree)
  if [[ $group == both ]]; then adapters=("$RUNS/overwrite-n16/adapter" "$RUNS/pause-n16/adapter"); prefix=
  else adapters=("$RUNS/paper-n16/adapter"); prefix=paper-; fi
  for split in wiki:0.05:192 owt:0.9:384; do
    IFS=: read -r data fraction sequences <<< "$split"
    out=$REPORT/budget-1200/more-sequences/$prefix$data
    [[ -f $out/eval.json ]] && continue
    echo "== 1200 steps, $group on $sequences sequences of $data ($(date -u +%H:%M))"
    $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "$fraction" --no-untrained \
      --coprocessors "${adapters[@]}" --sequences "$sequences" --positions 8 --min-position 15 --batch-size 16 \
      --out "$out" > "$RUNS/eval-more-$prefix$data.log" 2>&1 &
  done
  wait
done
for data in wiki owt; do  # the paper preset against the other two, on the same sequences and points (paired)
  more=$REPORT/budget-1200/more-sequences
  $DCA compare --columns "$more/$data/eval.json:overwrite-n16" "$more/$data/eval.json:pause-n16" \
    "$more/paper-$data/eval.json:paper-n16" > "$more/paired-$data.md"
done
# by context length: overwrite and pause tokens at points t >= 100 of the 256-token sequences (past the training
# length), and within it on wiki, t in [15, 60] (93-token sequences) against t in [100, 127] (160 tokens)
both=("$RUNS/overwrite-n16/adapter" "$RUNS/pause-n16/adapter")
for spec in late-points/wiki:wiki:0.05:256:100 late-points/owt:owt:0.9:256:100 \
            by-context/wiki-early:wiki:0.05:93:15 by-context/wiki-late:wiki:0.05:160:100; do
  IFS=: read -r name data fraction len min <<< "$spec"
  out=$REPORT/budget-1200/$name
  [[ -f $out/eval.json ]] && continue
  $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "$fraction" --no-untrained --coprocessors \
    "${both[@]}" --sequences 128 --seq-len "$len" --positions 8 --min-position "$min" --batch-size 16 --out "$out" \
    > "$RUNS/eval-${name//\//-}.log" 2>&1
done
more=$REPORT/budget-1200/more-sequences
score_more() {  # score_more NAME ADAPTER [untrained]: the more-sequences tables' sequences and points, both corpora,
  # into more/NAME-* (with "untrained", beside the untrained coprocessor of its config: an overwrite one is the frozen
  # decoder, so the others leave it out)
  local name=$1 adapter=$2 split data fraction sequences untrained=(--no-untrained)
  [[ ${3:-} == untrained ]] && untrained=()
  for split in wiki:0.05:192 owt:0.9:384; do
    IFS=: read -r data fraction sequences <<< "$split"
    [[ -f $more/$name-$data/eval.json ]] && continue
    $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "$fraction" "${untrained[@]}" \
      --coprocessors "$adapter" --sequences "$sequences" --positions 8 --min-position 15 --batch-size 16 \
      --out "$more/$name-$data" > "$RUNS/eval-more-$name-$data.log" 2>&1 &
  done
  wait
}
# session 9: a second seed of the overwrite run (the same command, --seed 1: another data order and LoRA initialisation;
# the soft tokens keep init_seed 0), paired against pause tokens and against seed 0
mkdir -p "${RUNS}-seed1"
RUNS=${RUNS}-seed1 run overwrite-n16 --lora-rank 16 --latent-positions overwrite --seed 1 \
  >> "${RUNS}-seed1/overwrite-n16.log" 2>&1
score_more seed1 "${RUNS}-seed1/overwrite-n16/adapter"
for data in wiki owt; do
  $DCA compare --columns "$more/seed1-$data/eval.json:overwrite-n16" "$more/$data/eval.json:pause-n16" \
    > "$more/paired-seed1-$data.md"
  $DCA compare --columns "$more/$data/eval.json:overwrite-n16=seed-0" \
    "$more/seed1-$data/eval.json:overwrite-n16=seed-1" > "$more/paired-seeds-$data.md"
done
# session 9: full fine-tuning of the coprocessor (the paper's best training, its Table 5) at the same budget: the
# overwrite command with lora_rank unset and lr 1e-4 (106M trainable parameters), paired against pause tokens and LoRA
mkdir -p "${RUNS}-full"
RUNS=${RUNS}-full run overwrite-n16 --latent-positions overwrite --lr 1e-4 --save-every 100 \
  >> "${RUNS}-full/overwrite-n16.log" 2>&1
score_more full "${RUNS}-full/overwrite-n16/adapter"
for data in wiki owt; do
  $DCA compare --columns "$more/full-$data/eval.json:overwrite-n16=full" "$more/$data/eval.json:pause-n16" \
    "$more/$data/eval.json:overwrite-n16=lora" > "$more/paired-full-$data.md"
done
# session 10, side by side: the overwrite run sampling every point t >= 0 (as the paper does; the others sample
# t >= N-1 = 15), and full fine-tuning at lr 3e-4 (the second point of a two-point sweep, 1e-4 being the first)
mkdir -p "${RUNS}-minpos0" "${RUNS}-full3e-4"
RUNS=${RUNS}-minpos0 run overwrite-n16 --lora-rank 16 --latent-positions overwrite --min-position 0 \
  >> "${RUNS}-minpos0/overwrite-n16.log" 2>&1 &
RUNS=${RUNS}-full3e-4 run overwrite-n16 --latent-positions overwrite --lr 3e-4 --save-every 100 \
  >> "${RUNS}-full3e-4/overwrite-n16.log" 2>&1 &
wait
score_more minpos0 "${RUNS}-minpos0/overwrite-n16/adapter"
score_more full3e-4 "${RUNS}-full3e-4/overwrite-n16/adapter"
for data in wiki owt; do
  $DCA compare --columns "$more/minpos0-$data/eval.json:overwrite-n16=t>=0" \
    "$more/full3e-4-$data/eval.json:overwrite-n16=full-3e-4" "$more/$data/eval.json:pause-n16=pause" \
    "$more/$data/eval.json:overwrite-n16=lora-t>=15" > "$more/paired-session10-$data.md"
done
# session 11: the every-point run, the t >= 15 run and pause tokens on every point t >= 0 of wiki (Table 1 as the
# paper samples it); then where the text after a point looks: its attention on the latents, by k,
every=$REPORT/budget-1200/every-point/wiki
[[ -f $every/eval.json ]] || $DCA eval --model smollm2-135m --data wiki --held-out-fraction 0.05 --no-untrained \
  --coprocessors "${RUNS}-minpos0/overwrite-n16/adapter" "$RUNS/overwrite-n16/adapter" "$RUNS/pause-n16/adapter" \
  --sequences 192 --positions 8 --min-position 0 --batch-size 16 --out "$every" > "$RUNS/eval-every-point-wiki.log" 2>&1
# and do the near and the far gain add up? The two trained modules stacked (nothing trained); both on both corpora
for split in wiki:0.05:192 owt:0.9:96; do
  IFS=: read -r data fraction sequences <<< "$split"
  attention=$REPORT/budget-1200/latent-attention/$data
  [[ -f $attention/latent_attention.json ]] || .venv/bin/python scripts/latent_attention.py --coprocessors \
    "overwrite=$RUNS/overwrite-n16/adapter" "paper preset=$RUNS/paper-n16/adapter" \
    "pause tokens=$RUNS/pause-n16/adapter" --data "$data" --held-out-fraction "$fraction" --sequences 64 \
    --positions 4 --out "$attention"
  stacked=$REPORT/budget-1200/overwrite-plus-pause/$data
  [[ -f $stacked/overwrite_plus_pause.json ]] || .venv/bin/python scripts/overwrite_plus_pause.py --overwrite \
    "$RUNS/overwrite-n16/adapter" --pause "$RUNS/pause-n16/adapter" --data "$data" --held-out-fraction "$fraction" \
    --sequences "$sequences" --positions 2 --out "$stacked"
done
# session 11: the overwrite run and pause tokens at twice that budget (2400 steps, 1.23M tokens: 1.2 passes over wiki's
# 7,846 training sequences), side by side, one thread each; a run of two sessions (resumed from its checkpoint)
RUNS_2400=${RUNS%-1200}-2400
mkdir -p "$RUNS_2400"
RUNS=$RUNS_2400 STEPS=2400 run overwrite-n16 --lora-rank 16 --latent-positions overwrite \
  >> "$RUNS_2400/overwrite-n16.log" 2>&1 &
RUNS=$RUNS_2400 STEPS=2400 run pause-n16 --method pause >> "$RUNS_2400/pause-n16.log" 2>&1 &
wait
score_more 2400-overwrite "$RUNS_2400/overwrite-n16/adapter"
score_more 2400-pause "$RUNS_2400/pause-n16/adapter"
for data in wiki owt; do
  $DCA compare --columns "$more/2400-overwrite-$data/eval.json:overwrite-n16=overwrite-2400" \
    "$more/2400-pause-$data/eval.json:pause-n16=pause-2400" "$more/$data/eval.json:overwrite-n16=overwrite-1200" \
    "$more/$data/eval.json:pause-n16=pause-1200" > "$more/paired-2400-$data.md"
done
# session 12: one coprocessor with both kinds of entries (--num-overwritten 16 of N = 32: the overwrite run's 16 latents
# in place of x[t-15 .. t], plus 16 appended after t, each with a trainable offset), first at the first runs' budget
# (300 steps), scored in one dca eval with the overwrite run and pause tokens of that budget (paired; 128 sequences,
# for want of cores: two other jobs shared them); then at the 1200-step budget, paired against that budget's runs,
# beside its untrained self (not a no-op)
RUNS_300=${RUNS%-1200}
mkdir -p "$RUNS_300-joint"
RUNS=$RUNS_300-joint STEPS=300 run overwrite16-plus16 --num-latents 32 --num-overwritten 16 --lora-rank 16 \
  --latent-positions overwrite >> "$RUNS_300-joint/overwrite16-plus16.log" 2>&1
for split in wiki:0.05 owt:0.9; do
  data=${split%:*}
  [[ -f $REPORT/budget-300-joint/$data/eval.json ]] || $DCA eval --model smollm2-135m --data "$data" \
    --held-out-fraction "${split#*:}" --no-untrained --coprocessors "$RUNS_300-joint/overwrite16-plus16/adapter" \
    "$RUNS_300/overwrite-n16/adapter" "$RUNS_300/pause-n16/adapter" --sequences 128 --positions 8 \
    --min-position 15 --batch-size 16 --out "$REPORT/budget-300-joint/$data" > "$RUNS_300-joint/eval-$data.log" 2>&1
done
RUNS_JOINT=${RUNS}-joint
mkdir -p "$RUNS_JOINT"
RUNS=$RUNS_JOINT run overwrite16-plus16 --num-latents 32 --num-overwritten 16 --lora-rank 16 \
  --latent-positions overwrite >> "$RUNS_JOINT/overwrite16-plus16.log" 2>&1
score_more joint "$RUNS_JOINT/overwrite16-plus16/adapter" untrained
for data in wiki owt; do
  $DCA compare --columns "$more/joint-$data/eval.json:overwrite16-plus16=both-kinds" \
    "$more/$data/eval.json:overwrite-n16=overwrite" "$more/$data/eval.json:pause-n16=pause" \
    > "$more/paired-joint-$data.md"
done
# session 13: the same, with the appended entries before the rewritten window (--appended-at window), 300 steps;
# scored alone on the session-12 points and paired against the stored per-sequence losses of that table
RUNS=$RUNS_300-joint STEPS=300 run plus16-before-overwrite16 --num-latents 32 --num-overwritten 16 --appended-at window \
  --lora-rank 16 --latent-positions overwrite >> "$RUNS_300-joint/plus16-before-overwrite16.log" 2>&1
for split in wiki:0.05 owt:0.9; do
  data=${split%:*}
  window=$REPORT/budget-300-window/$data
  [[ -f $window/eval.json ]] || $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" \
    --no-untrained --coprocessors "$RUNS_300-joint/plus16-before-overwrite16/adapter" --sequences 128 --positions 8 \
    --min-position 15 --batch-size 16 --out "$window" > "$RUNS_300-joint/eval-window-$data.log" 2>&1
  joint=$REPORT/budget-300-joint/$data/eval.json
  $DCA compare --columns "$window/eval.json:plus16-before-overwrite16=window" \
    "$joint:overwrite16-plus16=point" "$joint:overwrite-n16=overwrite" "$joint:pause-n16=pause" > "$window/paired.md"
done
# ... a second seed of it (another data order and LoRA initialisation), scored and paired the same way
mkdir -p "$RUNS_300-joint-seed1"
[[ -f $RUNS_300-joint-seed1/plus16-before-overwrite16/adapter/dca_config.json ]] || $DCA train \
  --config "$RUNS_300-joint/plus16-before-overwrite16/args.json" --seed 1 \
  --out "$RUNS_300-joint-seed1/plus16-before-overwrite16" >> "$RUNS_300-joint-seed1/plus16-before-overwrite16.log" 2>&1
for split in wiki:0.05 owt:0.9; do
  data=${split%:*}
  window=$REPORT/budget-300-window/seed1-$data
  [[ -f $window/eval.json ]] || $DCA eval --model smollm2-135m --data "$data" --held-out-fraction "${split#*:}" \
    --no-untrained --coprocessors "$RUNS_300-joint-seed1/plus16-before-overwrite16/adapter" --sequences 128 \
    --positions 8 --min-position 15 --batch-size 16 --out "$window" > "$RUNS_300-joint-seed1/eval-$data.log" 2>&1
  joint=$REPORT/budget-300-joint/$data/eval.json
  $DCA compare --columns "$window/eval.json:plus16-before-overwrite16=window-seed1" \
    "$REPORT/budget-300-window/$data/eval.json:plus16-before-overwrite16=window-seed0" \
    "$joint:overwrite-n16=overwrite" "$joint:pause-n16=pause" > "$window/paired.md"
done
# ... and at the 1200-step budget, scored on the more-sequences points and paired against that budget's runs
RUNS=$RUNS_JOINT run plus16-before-overwrite16 --num-latents 32 --num-overwritten 16 --appended-at window \
  --lora-rank 16 --latent-positions overwrite >> "$RUNS_JOINT/plus16-before-overwrite16.log" 2>&1
score_more window "$RUNS_JOINT/plus16-before-overwrite16/adapter"
for data in wiki owt; do
  $DCA compare --columns "$more/window-$data/eval.json:plus16-before-overwrite16=window" \
    "$more/$data/eval.json:overwrite-n16=overwrite" "$more/$data/eval.json:pause-n16=pause" \
    "$more/paper-$data/eval.json:paper-n16=paper" --out "$more/compare-window-$data" > "$more/paired-window-$data.md"
done
echo "== long-cpu done ($(date -u +%H:%M))"
