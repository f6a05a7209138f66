"""Reading cost: the lines a reader opens to follow one variant end to end (issue 37's measure).

    python bench/reading_cost.py            # the table, as the README's map carries it
    python bench/reading_cost.py --check    # exit 1 if a listed definition no longer exists

Counted as issue 37 counts it: the definitions of the variant's script that the variant runs, its room in sync/,
and what it calls in the shared loop (driver.py: the run's epochs, an epoch's steps); the shared pieces called by
name (data, checkpoints, results, faults, the compute model, measure.py's clock and epoch record) are not opened;
a last column adds the clock and the record. Each entry is `file:qualname`, a whole function or
class (`Class.method` for one method), its lines from `def`/`class` to its end, docstring included. The lists are
written by hand, so the table says exactly what was counted; --check keeps them from naming what is gone.
"""
import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The loop itself is in each script (its `train`); around it, what every one calls: the run's epochs and an
# epoch's steps (driver.py). The step clock, its phase declarations, the epoch's meter and its record (measure.py)
# are how the kit measures, called by name like data or checkpoints; the last column counts them too.
LOOP = ["driver.py:Run", "driver.py:Epoch"]
CLOCKS = ["measure.py:StepClock", "measure.py:EpochMeter", "measure.py:epoch_record"]
# The PS keeps the yardstick's kinds apart from the guide's worker step (DDP's and the all-reduce's sit inside
# their step and are counted there): the last column adds them, with the clock.
PS_YARDSTICK = ["ps_train.py:yardstick_kinds", "ps_train.py:make_local_step"]
DDP = ["baseline_multi_card.py:parse_args", "baseline_multi_card.py:make_train_step",
       "baseline_multi_card.py:make_method", "baseline_multi_card.py:train", "baseline_multi_card.py:main"]
AR = ["all_reduce_train.py:parse_args", "all_reduce_train.py:make_train_step", "all_reduce_train.py:make_sync",
      "all_reduce_train.py:make_method", "all_reduce_train.py:train", "all_reduce_train.py:main"]
# The PS: its script's CLI, the guide's worker and server, the roles and the loops, and the exchange's base
# (sync/ps.py); not opened, as the shared pieces: the placement (sync/ps_servers.py), the results' records
# (sync/ps.py: ServerStats, exchange_sizes, epoch_fields), the start-up line (describe), the yardstick's kinds and
# its no-communication step (yardstick_kinds, make_local_step). GUIDE: the guide's server's gather and update
# (a transport with a server of its own runs its own), and the transport --comm chooses (async: its own).
PS = ["ps_train.py:parse_args", "ps_train.py:make_worker_step", "ps_train.py:server_step", "ps_train.py:serve_pull",
      "ps_train.py:serve_epoch", "ps_train.py:make_layout", "ps_train.py:server_role", "ps_train.py:trainer_role",
      "ps_train.py:make_method", "ps_train.py:train", "ps_train.py:serve", "ps_train.py:main",
      "sync/ps.py:Bucket", "sync/ps.py:Layout", "sync/ps.py:Transport"]
GUIDE = ["ps_train.py:gather", "ps_train.py:update", "ps_train.py:make_transport"]
# the class, the contract it inherits, its buckets and the model-change counter (_Unused runs only with
# find_unused_parameters=True, which the script never passes)
GRADSYNC = ["sync/allreduce.py:GradSync", "sync/allreduce.py:_DdpContract", "sync/allreduce.py:_grad_bucket",
            "sync/allreduce.py:_registered"]

VARIANTS = {
    "DDP": DDP + LOOP,
    "DDP `--comm-hook powersgd`": DDP + ["baseline_multi_card.py:register_hook",
                                         "baseline_multi_card.py:PowerSGDSnapshot"] + LOOP,
    "all-reduce `--sync overlap`": AR + GRADSYNC + LOOP,
    "all-reduce `--sync ring`": AR + GRADSYNC + ["sync/allreduce.py:ring_all_reduce",
                                                 "sync/allreduce.py:_exchange"] + LOOP,
    "all-reduce `--sync hierarchical`": AR + GRADSYNC + ["sync/allreduce.py:HierarchicalSync",
                                                         "sync/allreduce.py:_Relay",
                                                         "sync/allreduce.py:_Exchange"] + LOOP,
    "all-reduce `--sync pipelined`": AR + GRADSYNC + ["sync/pipelined_allreduce.py:PipelinedSync",
                                                      "sync/pipelined_allreduce.py:_Exchanges",
                                                      "sync/pipelined_allreduce.py:_StandIns",
                                                      "sync/pipelined_allreduce.py:_AllReduceJob",
                                                      "sync/pipelined_allreduce.py:_optimizer_step",
                                                      "sync/pipelined_allreduce.py:next_partition",
                                                      "sync/buckets.py:run_jobs", "sync/buckets.py:sgd_step"] + LOOP,
    "PS `--comm collective`": PS + GUIDE + ["sync/ps.py:Collective"] + LOOP,
    "PS `--comm p2p`": PS + GUIDE + ["sync/ps.py:P2P"] + LOOP,
    "PS `--comm pipelined`": PS + ["ps_train.py:make_transport", "sync/ps_pipelined.py:Partitions",
                                   "sync/ps_pipelined.py:_PushPullJob", "sync/ps_pipelined.py:_Updater",
                                   "sync/ps_pipelined.py:_Exchange", "sync/ps_pipelined.py:Pipelined",
                                   "sync/buckets.py:run_jobs", "sync/buckets.py:sgd_step"] + LOOP,
    "PS `--mode async`": PS + ["sync/ps_async.py:Async", "sync/ps_async.py:_AsyncServer",
                               "sync/ps.py:Collective"] + LOOP,  # Collective: its final pull
    "all-reduce `--sync local` (local SGD)": AR + ["sync/local_sgd.py:LocalSGD"] + LOOP,
}


def definitions(path):
    """{qualname: lines} of the module-level functions and classes in `path`, and of each class's methods."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node.end_lineno - node.lineno + 1
            for sub in getattr(node, "body", []):
                if isinstance(node, ast.ClassDef) and isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub.end_lineno - sub.lineno + 1
    return out


def cost(entries, cache):
    """(files, lines, missing) of one variant's list."""
    files, lines, missing = set(), 0, []
    for entry in dict.fromkeys(entries):  # each definition once
        file, name = entry.split(":")
        defs = cache.setdefault(file, definitions(REPO / file) if (REPO / file).exists() else {})
        if name not in defs:
            missing.append(entry)
            continue
        files.add(file)
        lines += defs[name]
    return files, lines, missing


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that every listed definition exists")
    args = p.parse_args()
    cache, gone = {}, []
    rows = ["| variant | files | lines | with the measuring (clock, record; PS: the yardstick's kinds): files, lines |", "| --- | --- | ---: | ---: |"]
    for variant, entries in VARIANTS.items():
        files, lines, missing = cost(entries, cache)
        all_files, all_lines, _ = cost(entries + CLOCKS + (PS_YARDSTICK if variant.startswith("PS") else []), cache)
        gone += missing
        rows.append(f"| {variant} | {len(files)}: {', '.join(f'`{f}`' for f in sorted(files))} | {lines} "
                    f"| {len(all_files)}, {all_lines} |")
    if gone:
        sys.exit("reading_cost.py names definitions that no longer exist: " + ", ".join(gone))
    if not args.check:
        print("\n".join(rows))


if __name__ == "__main__":
    main()
