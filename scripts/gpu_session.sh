#!/usr/bin/env bash
# NOT RUN YET: written on a CPU-only machine for the first session that is lent a GPU (issue 9, items 1 and 5).
# The CUDA-only tests of the flex path, then `dca bench` on CUDA: flex vs grouped vs dense attention.
#
# For a lent H100 (30 min of device time, 10 per command): one step per `run` call, from the repository root, where
# the device tool sets $OUT (at most 8 files come back per call). Roughly 5 min a step, plus the machine's start:
#
#   scripts/gpu_session.sh tests   # flex: losses and gradients = dense (5 families, fp32), bf16 autocast, no recompiles
#   scripts/gpu_session.sh bench   # sizes xs, s, m: grouped, flex, dense one-pass and fine-tuning, fp32
#   scripts/gpu_session.sh sweep   # the P sweep (T=2048, N=64, A=16; P=16..128): grouped, flex, dense, bf16 autocast
#   scripts/gpu_session.sh paper   # the paper row (SmolLM2-135M's shape, P=128) at batch 8, bf16, checkpointed
#
# Nothing can be installed there: the machine's own python3 (torch, transformers, peft, matplotlib, pytest) runs dca
# from src/. Its versions may differ from pyproject's pins (torch 2.13, transformers 5.23), so each step records them.
set -euo pipefail
: "${OUT:?set by the device tool: the folder whose files come back}"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
$PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__,
"peft", peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' | tee "$OUT/versions.txt"
bench() {  # bench NAME ARGS...: one JSON (and the sweep's plot) per step; recompilations of flex logged beside it
  local name=$1; shift
  TORCH_LOGS=recompiles timeout 560 $PY -m dca bench --device cuda --repeats 3 --out "$OUT/$name.json" "$@" \
    2>&1 | tee "$OUT/$name.log"
}
case ${1:-} in
  tests) timeout 560 $PY -m pytest -q -p no:cacheprovider tests/attention/test_flex.py -k cuda \
           --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" ;;
  bench) bench bench --sizes xs s m --methods one_pass one_pass_flex one_pass_dense finetune ;;
  sweep) bench sweep --sizes sweep --methods one_pass one_pass_flex one_pass_dense --bf16 ;;
  paper) bench paper --sizes paper --batch 8 --bf16 --methods one_pass_flex_ckpt one_pass_ckpt finetune ;;
  *) echo "usage: $0 tests|bench|sweep|paper" >&2; exit 2 ;;
esac
