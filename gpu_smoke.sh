#!/usr/bin/env bash
# GPU smoke run: every method and variant for a few steps on NCCL with --synthetic, --amp (bf16, then fp16 with
# its GradScaler) and --channels-last, a --profile trace of the three main runs, the analysis's comparison table
# per dtype, then once DDP on 2 emulated nodes x 1 process over a shaped 1 Gbit/s link (emulate_cluster.sh; needs
# root, ip and tc). Exercises the GPU code paths in one command on a machine with GPUs; ends with what it ran.
#   bash gpu_smoke.sh                # all GPUs, ResNet50 at 224 px, batch 64 per process, bf16 and fp16
#   NPROC=4 bash gpu_smoke.sh        # 4 processes, even on 1 GPU: they share it (below)
#   NPROC=2 STEPS=10 DTYPES=bf16 CLUSTER=0 bash gpu_smoke.sh
# More processes than GPUs: the processes share the GPUs (KIT_SHARE_GPU=1, process i on GPU i % GPUs), each one a
# host of its own to NCCL, which then connects them through its socket transport: the real multi-rank NCCL code
# paths (collectives, groups, the PS's point-to-point) on one GPU. It does not stand in for NVLink or PCIe
# transfers between GPUs, nor for their speed: the processes take turns on the one GPU.
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
if [ "$NPROC" -gt "$NGPU" ]; then
  export KIT_SHARE_GPU=1
  HOW="$NPROC processes share $NGPU GPU(s) (KIT_SHARE_GPU=1: NCCL over its socket transport, one host per process)"
else
  HOW="$NPROC processes, one GPU each (of $NGPU)"
fi
echo "gpu_smoke.sh: $HOW; $STEPS steps a run; dtypes ${DTYPES:-bf16 fp16}; results in $ROOT/"
RAN=() SKIPPED=()

run() {  # run NAME SCRIPT NPROC ARGS...: one experiment, stop at the first failure
  local name=$1 script=$2 nproc=$3 t0=$SECONDS
  shift 3
  echo "== $name ($nproc processes, --amp-dtype $DTYPE)"
  if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$script" "${ARGS[@]}" "$@"; then
    echo "error: $name failed (its output is above)" >&2
    exit 1
  fi
  RAN+=("$name, $DTYPE, $nproc processes: $((SECONDS - t0)) s")
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
      if [ "$comm" = p2p ]; then  # p2p sends each tensor as it is: contiguous ones only (no --channels-last)
        all=("${ARGS[@]}") ARGS=()
        for a in "${all[@]}"; do [ "$a" = --channels-last ] || ARGS+=("$a"); done
      fi
      run "PS --comm $comm" ps_train.py "$NPROC" --comm "$comm" "${profile[@]}" --output "$OUT/results_ps_$comm.json"
      [ "$comm" != p2p ] || ARGS=("${all[@]}")
    done
    if [ "$DTYPE" = bf16 ]; then
      run "PS --servers all" ps_train.py "$NPROC" --servers all --output "$OUT/results_ps_sharded.json"
      if [ "$NPROC" -ge 3 ]; then
        run "PS --mode async" ps_train.py "$NPROC" --mode async --output "$OUT/results_ps_async.json"
      else
        SKIPPED+=("PS --mode async: needs 3+ processes (NPROC=$NPROC)")
      fi
    fi
  else
    SKIPPED+=("the parameter server ($DTYPE): needs 2+ processes (NPROC=$NPROC; NPROC=4 runs it on one GPU)")
  fi
  "$PY" analyze_results.py --results-dir "$OUT" --out-dir "$OUT"
done

# The emulated cluster on GPUs: 2 nodes x 1 process, both on GPU 0 when there is one GPU, each node a host of its own
# to NCCL; NCCL must go through the nodes' shaped links (emulate_cluster.sh's last lines say which transport it used).
if [ "${CLUSTER:-1}" = 0 ]; then
  SKIPPED+=("DDP on 2 emulated nodes: CLUSTER=0")
elif [ "$(id -u)" != 0 ] || ! command -v tc >/dev/null 2>&1; then
  SKIPPED+=("DDP on 2 emulated nodes: needs root, ip and tc (emulate_cluster.sh)")
else
  DTYPE=bf16 OUT="$ROOT/cluster" t0=$SECONDS
  mkdir -p "$OUT"
  ARGS=(--synthetic --amp --channels-last --backend nccl --epochs 1 --max-steps "$STEPS" --warmup-steps 5
        --batch-size "${BATCH_SIZE:-64}" --image-size "${IMAGE_SIZE:-224}" --workers 4 ${EXTRA_ARGS:-})
  echo "== DDP on 2 emulated nodes x 1 process, 1gbit links (emulate_cluster.sh)"
  if ! bash emulate_cluster.sh run --name smoke --nodes 2 --rate 1gbit --logs "$OUT/cluster_logs" -- \
       baseline_multi_card.py "${ARGS[@]}" --output "$OUT/results_baseline_ddp.json"; then
    echo "error: DDP on the emulated cluster failed (its output is above; logs in $OUT/cluster_logs)" >&2
    exit 1
  fi
  # NCCL's own account (NCCL_DEBUG=INFO, in the nodes' logs): 2 hosts, every connection through a socket
  via=$(grep -h ' NCCL INFO .* via ' "$OUT"/cluster_logs/node*.log | sed 's/.* via \([^ ]*\).*/\1/' | sort | uniq -c || true)
  if ! grep -qh ' NCCL INFO .*nNodes 2 ' "$OUT"/cluster_logs/node*.log || [ -z "$via" ] ||
     grep -qv 'NET/Socket' <<< "$via"; then
    echo "error: on the emulated cluster NCCL did not connect 2 hosts through sockets alone; its connections:" \
         "${via:-none logged} (see $OUT/cluster_logs/node<i>.log)" >&2
    exit 1
  fi
  "$PY" analyze_results.py --results-dir "$OUT" --out-dir "$OUT"
  RAN+=("DDP on 2 emulated nodes x 1 process, bf16, NCCL over the 1gbit links: $((SECONDS - t0)) s")
fi

[ "$NPROC" -le "$NGPU" ] ||
  SKIPPED+=("transfers between GPUs over NVLink or PCIe: the processes shared $NGPU GPU(s) through NCCL's sockets")
echo
echo "gpu_smoke.sh: all ${#RAN[@]} runs passed ($HOW):"
printf '  %s\n' "${RAN[@]}"
if [ ${#SKIPPED[@]} -gt 0 ]; then echo "not run:"; printf '  %s\n' "${SKIPPED[@]}"; fi
