#!/usr/bin/env bash
# GPU smoke run: every method and variant for a few steps on NCCL with --synthetic, --amp (bf16, then fp16 with
# its GradScaler) and --channels-last, a --profile trace of the three main runs, then the analysis's comparison
# table per dtype. Exercises the GPU code paths in one command on a machine with GPUs.
#   bash gpu_smoke.sh                # all GPUs, ResNet50 at 224 px, batch 64 per GPU, bf16 and fp16
#   NPROC=2 STEPS=30 DTYPES=bf16 bash gpu_smoke.sh
# Not covered: the PS on one GPU (NCCL needs a GPU per process; the scripts run gloo on the CPU).
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
# The scripts' variant lists (the first is each one's default), from modes.py
AR_SYNCS=$("$PY" modes.py SYNC_MODES) PS_COMMS=$("$PY" modes.py PS_COMMS) DDP_HOOKS=$("$PY" modes.py COMM_HOOKS)
STEPS=${STEPS:-20}
ROOT=${OUT_DIR:-smoke_results}
rm -rf "$ROOT"

run() {  # run NAME SCRIPT NPROC ARGS...: one experiment, stop at the first failure
  local name=$1 script=$2 nproc=$3
  shift 3
  echo "== $name ($nproc processes, --amp-dtype $DTYPE)"
  if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$script" "${ARGS[@]}" "$@"; then
    echo "error: $name failed (its output is above)" >&2
    exit 1
  fi
}

for DTYPE in ${DTYPES:-bf16 fp16}; do
  OUT="$ROOT/$DTYPE"
  mkdir -p "$OUT"
  ARGS=(--synthetic --amp --amp-dtype "$DTYPE" --channels-last --backend nccl --epochs 2 --max-steps "$STEPS"
        --warmup-steps 5 --batch-size "${BATCH_SIZE:-64}" --image-size "${IMAGE_SIZE:-224}" --workers 4 ${EXTRA_ARGS:-})
  run "DDP" baseline_multi_card.py "$NPROC" --profile 5 --output "$OUT/results_baseline_ddp.json"
  for hook in ${DDP_HOOKS#* }; do
    run "DDP --comm-hook $hook" baseline_multi_card.py "$NPROC" --comm-hook "$hook" --powersgd-warmup 5 \
        --output "$OUT/results_baseline_ddp_$hook.json"
  done
  for sync in $AR_SYNCS; do
    profile=(); [ "$sync" = overlap ] && profile=(--profile 5)
    run "all-reduce --sync $sync" all_reduce_train.py "$NPROC" --sync "$sync" "${profile[@]}" \
        --output "$OUT/results_all_reduce_${sync//-/_}.json"
  done
  run "all-reduce --compress fp16" all_reduce_train.py "$NPROC" --compress fp16 --output "$OUT/results_all_reduce_fp16.json"
  if [ "$NPROC" -ge 2 ]; then
    for comm in $PS_COMMS; do
      profile=(); [ "$comm" = collective ] && profile=(--profile 5)
      run "PS --comm $comm" ps_train.py "$NPROC" --comm "$comm" "${profile[@]}" --output "$OUT/results_ps_$comm.json"
    done
    [ "$DTYPE" = bf16 ] && run "PS --servers all" ps_train.py "$NPROC" --servers all --output "$OUT/results_ps_sharded.json"
    [ "$DTYPE" = bf16 ] && [ "$NPROC" -ge 3 ] && \
      run "PS --mode async" ps_train.py "$NPROC" --mode async --output "$OUT/results_ps_async.json"
  else
    echo "note: the parameter server needs 2+ processes and NCCL one GPU per process: PS skipped on 1 GPU"
  fi
  "$PY" analyze_results.py --results-dir "$OUT" --out-dir "$OUT"
done
