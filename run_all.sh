#!/usr/bin/env bash
# The guide's quick full run: clears old results, runs the three methods with torchrun, analyses them.
#
#   bash run_all.sh                   every GPU with NCCL, else 4 CPU processes with gloo; the guide's defaults
#   NPROC=2 EPOCHS=1 bash run_all.sh  any setting can be overridden from the environment (below)
#   bash run_all.sh --variants        also every all-reduce --sync mode and every PS --comm mode
#   bash run_all.sh --sweep "2 4"     also these process counts (files *_np2.json ...), for plots/scaling.png
#
# Environment: NPROC, EPOCHS, BATCH_SIZE (per process), WORKERS, DATA_DIR (default ./train + ./val when
# present, else the built-in sample dataset), BACKEND (nccl|gloo), EXTRA_ARGS (passed to all three
# scripts, e.g. "--arch resnet18 --max-steps 5"), RESULTS_DIR (default ./), PYTHON (default .venv's, else
# python3), DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AR_SYNCS="per-param bucketed overlap ring"   # all_reduce_train.py --sync choices; overlap is its default
PS_COMMS="collective p2p overlap"            # ps_train.py --comm choices; collective is its default

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
VARIANTS=0
SWEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=1 ;;
    --sweep) [ $# -ge 2 ] || die "--sweep needs process counts, e.g. --sweep \"2 4\""; SWEEP="$2"; shift ;;
    --sweep=*) SWEEP="${1#--sweep=}" ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (options: --variants, --sweep \"2 4\"; settings go in the environment, see --help)" ;;
  esac
  shift
done

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$GPUS" -gt 0 ]; then DEFAULT_NPROC=$GPUS DEFAULT_BACKEND=nccl; else DEFAULT_NPROC=4 DEFAULT_BACKEND=gloo; fi
NPROC=${NPROC:-$DEFAULT_NPROC}
BACKEND=${BACKEND:-$DEFAULT_BACKEND}
RESULTS_DIR=${RESULTS_DIR:-.}
DRY_RUN=${DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
for n in $NPROC $SWEEP; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "process count '$n' is not a positive integer (NPROC or --sweep)"
done

ARGS=(--backend "$BACKEND")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
[ -n "${WORKERS:-}" ] && ARGS+=(--workers "$WORKERS")
[ -n "${DATA_DIR:-}" ] && ARGS+=(--data-dir "$DATA_DIR")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

if [ -n "${DATA_DIR:-}" ]; then DATASET="$DATA_DIR"
elif [ -d train ]; then DATASET="./train and ./val"
else DATASET="the built-in sample dataset (no DATA_DIR, no ./train)"; fi
echo "run_all.sh: $NPROC processes ($BACKEND; $GPUS GPU(s) found), dataset: $DATASET, python: $PYTHON"
echo "            arguments for every script: ${ARGS[*]}; results in $RESULTS_DIR"

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
if [ "$VARIANTS" = 1 ]; then
  for mode in $AR_SYNCS; do
    [ "$mode" = overlap ] && continue
    PLAN+=("Manual All-Reduce --sync $mode|$NPROC|results_all_reduce_${mode//-/_}.json|all_reduce_train.py --sync $mode")
  done
  if [ "$NPROC" -ge 2 ]; then
    for comm in $PS_COMMS; do
      [ "$comm" = collective ] && continue
      PLAN+=("Parameter Server --comm $comm|$NPROC|results_ps_$comm.json|ps_train.py --comm $comm")
    done
  fi
fi
for n in $SWEEP; do
  [ "$n" = "$NPROC" ] || plan_methods "$n" "_np$n"
done

if [ "$DRY_RUN" != 1 ]; then
  mkdir -p "$RESULTS_DIR"
  rm -f "$RESULTS_DIR"/results_*.json "$RESULTS_DIR/performance_report.txt" "$RESULTS_DIR/report_tables.md"
  rm -rf "$RESULTS_DIR/plots"
fi

START=$SECONDS
i=0
for entry in "${PLAN[@]}"; do
  IFS='|' read -r name n output script_and_flags <<< "$entry"
  read -r -a script_and_flags <<< "$script_and_flags"
  i=$((i + 1))
  cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" "$HERE/${script_and_flags[0]}"
       "${ARGS[@]}" "${script_and_flags[@]:1}" --output "$RESULTS_DIR/$output")
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
