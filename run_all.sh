#!/usr/bin/env bash
# The guide's quick full run: moves earlier results aside (to previous/<time>/, and says so), runs the three
# methods with torchrun, analyses them.
#
#   bash run_all.sh                   every GPU with NCCL, else 4 CPU processes with gloo; the guide's defaults
#                                     (on the built-in sample dataset: a from-scratch recipe that learns in minutes)
#   NPROC=2 EPOCHS=1 bash run_all.sh  any setting can be overridden from the environment (below)
#   bash run_all.sh --variants        also every all-reduce --sync mode, every PS --comm mode, the sharded PS
#                                     (--servers all) and the asynchronous PS (--mode async; 3+ processes)
#   bash run_all.sh --compression     also DDP's fp16/bf16/PowerSGD hooks and the all-reduce's --compress fp16/bf16
#   bash run_all.sh --bucket-sweep "1 5 25 100"
#                                     also DDP and --sync overlap at these bucket sizes (MiB), for plots/bucket_size.png
#   bash run_all.sh --seeds "0 1 2"   every experiment once per seed (files *_seed1.json ...): the analysis then
#                                     reports mean and spread, and judges differences against seed-to-seed noise
#   bash run_all.sh --sweep "2 4"     also these process counts (files *_np2.json ...), for plots/scaling.png
#   bash run_all.sh --cluster 4x1 --link-rate 1gbit
#                                     every experiment on an emulated cluster (emulate_cluster.sh, needs root):
#                                     4 nodes x 1 process (NPROC = 4), each node on its own 1gbit link (default)
#                                     into one switch; a --sweep count n runs on n / (processes per node) nodes
#   bash run_all.sh --cluster 4x1+4   the same, plus 4 server nodes (1 process each, own links): the PS with servers
#                                     of their own (ps_train.py --comm pipelined --server-ranks 4) on 8 nodes, the
#                                     other experiments on the 4 worker nodes as with --cluster 4x1
#   bash run_all.sh --target-accuracy 75
#                                     every run stops at the end of the first epoch whose validation accuracy
#                                     reaches 75% and records the training time it took (the report's first answer:
#                                     which method got there first); on the sample dataset the default is
#                                     SAMPLE_TARGET (sample_recipe.env, 70%); "none": train every epoch
#   bash run_all.sh --max-restarts 2  torchrun restarts a run's processes up to 2 times when one fails (default 0);
#                                     restarted processes continue from the run's latest checkpoint
#   bash run_all.sh --check           runs nothing: checks what these settings would use and what would fail
#                                     (GPUs and backend, packages, flags, data, weights, disk, rendezvous)
#
# Environment: NPROC, EPOCHS, BATCH_SIZE (per process), WORKERS, DATA_DIR (default ./train + ./val when
# present, else the built-in sample dataset), BACKEND (nccl|gloo), EXTRA_ARGS (passed to all three
# scripts, e.g. "--arch resnet18 --max-steps 5"), RESULTS_DIR (default ./), PYTHON (default .venv's, else
# python3), DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The sample dataset's first-run recipe (SAMPLE_EPOCHS, SAMPLE_BATCH, SAMPLE_RECIPE: ResNet-18 from scratch, warm-up
# and cosine decay), in the one file Python reads too.
source "$HERE/sample_recipe.env"

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
VARIANTS=0 COMPRESSION=0 CHECK=0
SWEEP="" BUCKETS="" SEEDS=""
CLUSTER=""
LINK_RATE=""
MAX_RESTARTS=""
TARGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=1 ;;
    --compression) COMPRESSION=1 ;;
    --check) CHECK=1 ;;
    --bucket-sweep) [ $# -ge 2 ] || die "--bucket-sweep needs sizes in MiB, e.g. --bucket-sweep \"1 5 25 100\""; BUCKETS="$2"; shift ;;
    --bucket-sweep=*) BUCKETS="${1#--bucket-sweep=}" ;;
    --seeds) [ $# -ge 2 ] || die "--seeds needs seeds, e.g. --seeds \"0 1 2\""; SEEDS="$2"; shift ;;
    --seeds=*) SEEDS="${1#--seeds=}" ;;
    --sweep) [ $# -ge 2 ] || die "--sweep needs process counts, e.g. --sweep \"2 4\""; SWEEP="$2"; shift ;;
    --sweep=*) SWEEP="${1#--sweep=}" ;;
    --cluster) [ $# -ge 2 ] || die "--cluster needs NODESxPROCS, e.g. --cluster 4x1"; CLUSTER="$2"; shift ;;
    --cluster=*) CLUSTER="${1#--cluster=}" ;;
    --link-rate) [ $# -ge 2 ] || die "--link-rate needs a rate, e.g. --link-rate 1gbit"; LINK_RATE="$2"; shift ;;
    --link-rate=*) LINK_RATE="${1#--link-rate=}" ;;
    --target-accuracy) [ $# -ge 2 ] || die "--target-accuracy needs a percentage, e.g. --target-accuracy 70 (or none)"; TARGET="$2"; shift ;;
    --target-accuracy=*) TARGET="${1#--target-accuracy=}" ;;
    --max-restarts) [ $# -ge 2 ] || die "--max-restarts needs a count, e.g. --max-restarts 1"; MAX_RESTARTS="$2"; shift ;;
    --max-restarts=*) MAX_RESTARTS="${1#--max-restarts=}" ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) die "unknown option $1 (options: --variants, --compression, --bucket-sweep \"1 5 25\", --seeds \"0 1\", --sweep \"2 4\", --cluster 4x1, --link-rate 1gbit, --target-accuracy 70, --max-restarts 1, --check; settings go in the environment, see --help)" ;;
  esac
  shift
done

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$GPUS" -gt 0 ]; then DEFAULT_NPROC=$GPUS DEFAULT_BACKEND=nccl; else DEFAULT_NPROC=4 DEFAULT_BACKEND=gloo; fi
CL_SERVERS=0
if [ -n "$CLUSTER" ]; then  # NODESxPROCS[+SERVERS]: NPROC is NODES x PROCS, the workers'
  [[ "$CLUSTER" =~ ^([1-9][0-9]*)x([1-9][0-9]*)(\+([1-9][0-9]?))?$ ]] ||
    die "--cluster '$CLUSTER' is not NODESxPROCS[+SERVERS] (e.g. --cluster 4x1, or 4x1+4 with 4 server nodes)"
  CL_NODES=${BASH_REMATCH[1]} CL_PROCS=${BASH_REMATCH[2]} CL_SERVERS=${BASH_REMATCH[4]:-0}
  [ -z "${NPROC:-}" ] || [ "$NPROC" = $((CL_NODES * CL_PROCS)) ] ||
    die "NPROC=$NPROC differs from --cluster $CLUSTER ($((CL_NODES * CL_PROCS)) processes; leave NPROC unset)"
  NPROC=$((CL_NODES * CL_PROCS))
  LINK_RATE=${LINK_RATE:-1gbit}
elif [ -n "$LINK_RATE" ]; then
  die "--link-rate needs --cluster (e.g. --cluster 4x1 --link-rate $LINK_RATE)"
fi
NPROC=${NPROC:-$DEFAULT_NPROC}
BACKEND=${BACKEND:-$DEFAULT_BACKEND}
RESULTS_DIR=${RESULTS_DIR:-.}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
# The scripts' variant lists (the first is each one's default), from modes.py: one source for shell and Python.
AR_SYNCS=$("$PYTHON" "$HERE/modes.py" SYNC_MODES) PS_COMMS=$("$PYTHON" "$HERE/modes.py" PS_COMMS)
DDP_HOOKS=$("$PYTHON" "$HERE/modes.py" COMM_HOOKS)
for n in $NPROC $SWEEP; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "process count '$n' is not a positive integer (NPROC or --sweep)"
  if [ -n "$CLUSTER" ]; then  # a sweep count runs on the first n/PROCS nodes; the cluster has the most needed
    [ $((n % CL_PROCS)) = 0 ] || die "--sweep count $n is not a multiple of the $CL_PROCS processes per node of --cluster $CLUSTER"
    [ $((n / CL_PROCS)) -le "$CL_NODES" ] || CL_NODES=$((n / CL_PROCS))
  fi
done

for b in $BUCKETS; do
  [[ "$b" =~ ^[0-9]+([.][0-9]+)?$ ]] && [ "$b" != 0 ] || die "bucket size '$b' is not a positive number of MiB (--bucket-sweep)"
done
for s in $SEEDS; do
  [[ "$s" =~ ^[0-9]+$ ]] || die "seed '$s' is not a non-negative integer (--seeds)"
done
if [ -n "$TARGET" ] && [ "$TARGET" != none ]; then
  [[ "$TARGET" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v t="$TARGET" 'BEGIN { exit !(t > 0 && t <= 100) }' ||
    die "--target-accuracy '$TARGET' is not a percentage in (0, 100] (e.g. --target-accuracy 70, or none)"
fi
RESTARTS=()
if [ -n "$MAX_RESTARTS" ]; then
  [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts '$MAX_RESTARTS' is not a whole number (e.g. --max-restarts 1)"
  RESTARTS=(--max_restarts="$MAX_RESTARTS")
  # a restarted group's store must be a new one, not torchrun's shared one (pytorch/pytorch#135712)
  [ "$MAX_RESTARTS" = 0 ] || export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

ARGS=(--backend "$BACKEND")
if [ -n "${DATA_DIR:-}" ]; then DATASET="$DATA_DIR"
elif [ -d train ]; then DATASET="./train and ./val"
else
  DATASET="the built-in sample dataset (no DATA_DIR, no ./train) with its first-run recipe"
  read -r -a RECIPE <<< "$SAMPLE_RECIPE"
  EPOCHS=${EPOCHS:-$SAMPLE_EPOCHS} BATCH_SIZE=${BATCH_SIZE:-$SAMPLE_BATCH}
  if [ "$EPOCHS" -lt "$SAMPLE_EPOCHS" ] 2>/dev/null; then  # a shorter run keeps the recipe's shape: warm-up scaled
    for k in "${!RECIPE[@]}"; do
      if [ "${RECIPE[k]}" = --lr-warmup-epochs ]; then
        RECIPE[k+1]=$(awk -v w="${RECIPE[k+1]}" -v e="$EPOCHS" -v s="$SAMPLE_EPOCHS" 'BEGIN { printf "%.3g", w * e / s }')
        DATASET+=" (EPOCHS=$EPOCHS of its $SAMPLE_EPOCHS: warm-up scaled to ${RECIPE[k+1]} epochs)"
      fi
    done
  fi
  ARGS+=("${RECIPE[@]}")
  TARGET=${TARGET:-$SAMPLE_TARGET}
fi
if [ -n "$TARGET" ] && [ "$TARGET" != none ]; then ARGS+=(--target-accuracy "$TARGET"); fi
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
[ -n "${WORKERS:-}" ] && ARGS+=(--workers "$WORKERS")
[ -n "${DATA_DIR:-}" ] && ARGS+=(--data-dir "$DATA_DIR")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
echo "run_all.sh: $NPROC processes ($BACKEND; $GPUS GPU(s) found), dataset: $DATASET, python: $PYTHON"
echo "            arguments for every script: ${ARGS[*]}; results in $RESULTS_DIR"
if [ "$CHECK" = 1 ]; then  # preflight.py with exactly these settings; nothing is run or removed
  CHECK_CMD=("$PYTHON" "$HERE/preflight.py" --from-run-all --nproc "$NPROC" --sweep "$SWEEP" --results-dir "$RESULTS_DIR")
  [ -z "$CLUSTER" ] || CHECK_CMD+=(--cluster "${CL_NODES}x$CL_PROCS" --link-rate "$LINK_RATE")
  exec "${CHECK_CMD[@]}" -- "${ARGS[@]}"
fi
if [ -n "$CLUSTER" ]; then
  CL_NAME="runall$$"  # unique to this run; removed at exit, however it ends
  CL_UP=(bash "$HERE/emulate_cluster.sh" up --name "$CL_NAME" --nodes $((CL_NODES + CL_SERVERS)) --rate "$LINK_RATE")
  echo "            on an emulated cluster: nodes of $CL_PROCS process(es), each on its own $LINK_RATE link: ${CL_UP[*]}"
  export PYTHON
  if [ "$DRY_RUN" != 1 ]; then
    trap 'bash "$HERE/emulate_cluster.sh" down --name "$CL_NAME" >/dev/null 2>&1 || true' EXIT
    trap 'exit 130' INT; trap 'exit 143' TERM
    "${CL_UP[@]}"
  fi
fi

# The plan: one line per experiment, "name|processes|results file|script and its own flags".
PLAN=()
plan_methods() {  # process count, results-file suffix
  local n=$1 suffix=$2
  PLAN+=("Baseline DDP, np=$n|$n|results_baseline_ddp$suffix.json|baseline_multi_card.py")
  PLAN+=("Manual All-Reduce, np=$n|$n|results_all_reduce$suffix.json|all_reduce_train.py")
  if [ "$n" -ge 2 ]; then
    PLAN+=("Parameter Server, np=$n|$n|results_ps$suffix.json|ps_train.py")
  else
    echo "run_all.sh: note: skipping the parameter server at np=$n (it needs a server and a worker)"
  fi
}
plan_methods "$NPROC" ""
if [ "$CL_SERVERS" -gt 0 ]; then  # its workers on the worker nodes, its servers on the server nodes (the last ranks)
  PLAN+=("Parameter Server, $CL_SERVERS server nodes|$((NPROC + CL_SERVERS))|results_ps_pipelined_servers$CL_SERVERS.json|ps_train.py --comm pipelined --server-ranks $CL_SERVERS")
fi
if [ "$VARIANTS" = 1 ]; then
  for mode in ${AR_SYNCS#* }; do  # all but the default
    PLAN+=("Manual All-Reduce --sync $mode|$NPROC|results_all_reduce_${mode//-/_}.json|all_reduce_train.py --sync $mode")
  done
  if [ "$NPROC" -ge 2 ]; then
    for comm in ${PS_COMMS#* }; do
      PLAN+=("Parameter Server --comm $comm|$NPROC|results_ps_$comm.json|ps_train.py --comm $comm")
    done
    PLAN+=("Parameter Server --servers all (sharded)|$NPROC|results_ps_sharded.json|ps_train.py --servers all")
    [ "$NPROC" -ge 3 ] && PLAN+=("Parameter Server --mode async|$NPROC|results_ps_async.json|ps_train.py --mode async")
  fi
fi
if [ "$COMPRESSION" = 1 ]; then
  for hook in ${DDP_HOOKS#* }; do  # PowerSGD compresses only after its warm-up: 10 plain steps here
    PLAN+=("Baseline DDP --comm-hook $hook|$NPROC|results_baseline_ddp_$hook.json|baseline_multi_card.py --comm-hook $hook --powersgd-warmup 10")
  done
  for dtype in fp16 bf16; do
    PLAN+=("Manual All-Reduce --compress $dtype|$NPROC|results_all_reduce_$dtype.json|all_reduce_train.py --compress $dtype")
  done
fi
for b in $BUCKETS; do  # 25 MiB is both methods' default: the main runs already have it
  [ "$b" = 25 ] && continue
  PLAN+=("Baseline DDP --bucket-mb $b|$NPROC|results_baseline_ddp_bucket${b}.json|baseline_multi_card.py --bucket-mb $b")
  PLAN+=("Manual All-Reduce --bucket-mb $b|$NPROC|results_all_reduce_bucket${b}.json|all_reduce_train.py --bucket-mb $b")
done
for n in $SWEEP; do
  [ "$n" = "$NPROC" ] || plan_methods "$n" "_np$n"
done
if [ -n "$SEEDS" ]; then  # the whole plan once per seed, each file saying its seed
  ONE_SEED=("${PLAN[@]}")
  PLAN=()
  for s in $SEEDS; do
    for entry in "${ONE_SEED[@]}"; do
      IFS='|' read -r name n output flags <<< "$entry"
      PLAN+=("$name, seed $s|$n|${output%.json}_seed$s.json|$flags --seed $s")
    done
  done
fi

if [ "$DRY_RUN" != 1 ]; then  # an earlier run's files are moved aside, never deleted, and the move is said
  mkdir -p "$RESULTS_DIR"
  shopt -s nullglob
  OLD=("$RESULTS_DIR"/results_*.json "$RESULTS_DIR"/trace_*.json "$RESULTS_DIR/performance_report.txt"
       "$RESULTS_DIR/report_tables.md" "$RESULTS_DIR/plots")
  shopt -u nullglob
  OLD_FILES=()
  for f in ${OLD[@]+"${OLD[@]}"}; do [ -e "$f" ] && OLD_FILES+=("$f"); done
  if [ ${#OLD_FILES[@]} -gt 0 ]; then
    AWAY="$RESULTS_DIR/previous/$(date +%Y-%m-%d_%H-%M-%S)"
    mkdir -p "$AWAY"
    mv "${OLD_FILES[@]}" "$AWAY/"
    echo "run_all.sh: moved the earlier run's ${#OLD_FILES[@]} file(s) (results, report, plots) to $AWAY/"
  fi
fi

START=$SECONDS
i=0
for entry in "${PLAN[@]}"; do
  IFS='|' read -r name n output script_and_flags <<< "$entry"
  read -r -a script_and_flags <<< "$script_and_flags"
  i=$((i + 1))
  script_args=("$HERE/${script_and_flags[0]}" "${ARGS[@]}" "${script_and_flags[@]:1}" --output "$RESULTS_DIR/$output")
  cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" ${RESTARTS[@]+"${RESTARTS[@]}"} "${script_args[@]}")
  if [ -n "$CLUSTER" ]; then  # the same script and flags, one torchrun per emulated node
    servers=0; [[ " ${script_and_flags[*]} " != *" --server-ranks "* ]] || servers=$CL_SERVERS
    cmd=(bash "$HERE/emulate_cluster.sh" torchrun --name "$CL_NAME" --nodes $(((n - servers) / CL_PROCS + servers))
         --nproc-per-node "$CL_PROCS" $([ "$servers" = 0 ] || echo --server-nodes "$servers")
         ${MAX_RESTARTS:+--max-restarts "$MAX_RESTARTS"}
         --logs "$RESULTS_DIR/cluster_logs/${output%.json}" -- "${script_args[@]}")
  fi
  echo
  echo "=== [$i/${#PLAN[@]}] $name -> $RESULTS_DIR/$output"
  echo "    ${cmd[*]}"
  [ "$DRY_RUN" = 1 ] && continue
  t0=$SECONDS
  rc=0
  "${cmd[@]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo >&2
    echo "run_all.sh: error: experiment $i/${#PLAN[@]} ($name) failed with exit code $rc after $((SECONDS - t0))s;" \
         "stopped, the remaining experiments were not run (its error is above; finished results are in $RESULTS_DIR)" >&2
    exit "$rc"
  fi
  echo "=== $name done in $((SECONDS - t0))s"
done

ANALYZE=("$PYTHON" "$HERE/analyze_results.py" --results-dir "$RESULTS_DIR" --out-dir "$RESULTS_DIR")
echo
echo "=== analysis: ${ANALYZE[*]}"
[ "$DRY_RUN" = 1 ] && exit 0
"${ANALYZE[@]}" || { rc=$?; echo "run_all.sh: error: the analysis failed with exit code $rc" >&2; exit "$rc"; }
echo
echo "=== all done in $((SECONDS - START))s; files:"
ls -lh "$RESULTS_DIR"/results_*.json "$RESULTS_DIR/performance_report.txt" "$RESULTS_DIR/report_tables.md" \
       "$RESULTS_DIR"/plots/*.png
