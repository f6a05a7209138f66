#!/usr/bin/env bash
# GPU smoke run: every method and variant for a few steps on NCCL with --synthetic, --amp and --channels-last,
# then the analysis's comparison table. Exercises the GPU code paths in one command on a machine with GPUs.
#   bash gpu_smoke.sh                # all GPUs, ResNet50 at 224 px, batch 64 per GPU
#   NPROC=2 STEPS=30 bash gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "$NGPU" -lt 1 ]; then
  echo "error: gpu_smoke.sh needs NVIDIA GPUs and nvidia-smi found none (on CPU use run_all.sh)" >&2
  exit 2
fi
NPROC=${NPROC:-$NGPU}
AR_SYNCS="overlap bucketed per-param ring"  # the scripts' lists (tests/test_run_all.py checks these copies)
PS_COMMS="collective p2p overlap"
STEPS=${STEPS:-20}
OUT=${OUT_DIR:-smoke_results}
rm -rf "$OUT" && mkdir -p "$OUT"
ARGS=(--synthetic --amp --channels-last --backend nccl --epochs 2 --max-steps "$STEPS" --warmup-steps 5
      --batch-size "${BATCH_SIZE:-64}" --image-size "${IMAGE_SIZE:-224}" --workers 4 ${EXTRA_ARGS:-})

run() {  # run NAME SCRIPT ARGS...: one experiment, stop at the first failure
  local name=$1 script=$2 nproc=$3
  shift 3
  echo "== $name ($nproc processes)"
  if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$script" "${ARGS[@]}" "$@"; then
    echo "error: $name failed (its output is above)" >&2
    exit 1
  fi
}

run "DDP" baseline_multi_card.py "$NPROC" --output "$OUT/results_baseline_ddp.json"
for sync in $AR_SYNCS; do
  run "all-reduce --sync $sync" all_reduce_train.py "$NPROC" --sync "$sync" \
      --output "$OUT/results_all_reduce_${sync//-/_}.json"
done
if [ "$NPROC" -ge 2 ]; then
  for comm in $PS_COMMS; do
    run "PS --comm $comm" ps_train.py "$NPROC" --comm "$comm" --output "$OUT/results_ps_$comm.json"
  done
else
  echo "note: the parameter server needs 2+ processes and NCCL one GPU per process: PS skipped on 1 GPU"
fi
"$PY" analyze_results.py --results-dir "$OUT" --out-dir "$OUT"
