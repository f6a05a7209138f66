"""The names the training scripts, the analysis, the benchmarks and the shell scripts share, without importing
torch: each script's variants (its default first), how a results file is named, and the built-in sample
dataset's first-run recipe (sample_recipe.env, which run_all.sh sources too).
"""
import shlex
from pathlib import Path

# kind (the results' "kind" field) -> the guide's "method" text
METHODS = {"baseline_ddp": "Baseline DDP (PyTorch)", "all_reduce": "Manual All-Reduce",
           "ps": "Parameter Server (PS)"}
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")  # baseline_multi_card.py --comm-hook
# all_reduce_train.py --sync; "local" is local SGD (parameters averaged every --local-steps steps, no gradient sync)
SYNC_MODES = ("overlap", "bucketed", "per-param", "ring", "pipelined", "hierarchical", "local")
COMPRESSION = ("none", "fp16", "bf16")  # all_reduce_train.py --compress
PS_COMMS = ("collective", "p2p", "overlap", "pipelined")  # ps_train.py --comm
PS_SERVERS = ("1", "all")  # ps_train.py --servers
PS_MODES = ("sync", "async")  # ps_train.py --mode
DEFAULT_BUCKET_MB = 25.0  # --bucket-mb of DDP (torch's bucket_cap_mb), the all-reduce and the PS
PARTITION_MB = 4.0  # ps_train --comm pipelined's default --bucket-mb: BytePS's partitions are a few MB

RECIPE_FILE = Path(__file__).resolve().parent / "sample_recipe.env"


def variant_output(stem, variant, default_variant):
    """results_<stem>.json for a script's default variant, results_<stem>_<variant>.json for the others."""
    suffix = "" if variant == default_variant else "_" + str(variant).replace("-", "_")
    return f"results_{stem}{suffix}.json"


def sample_recipe(path=RECIPE_FILE):
    """The sample dataset's first-run recipe as {name: value}: SAMPLE_EPOCHS, SAMPLE_BATCH, SAMPLE_TARGET (str) and
    SAMPLE_RECIPE (a list of flags), read from the file run_all.sh sources."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            values[name.strip()] = " ".join(shlex.split(value))  # the value as the shell sees it
    values["SAMPLE_RECIPE"] = shlex.split(values["SAMPLE_RECIPE"])
    return values


def sample_args(path=RECIPE_FILE):
    """The recipe as the flags run_all.sh gives every script on the sample dataset."""
    r = sample_recipe(path)
    return [*r["SAMPLE_RECIPE"], "--epochs", r["SAMPLE_EPOCHS"], "--batch-size", r["SAMPLE_BATCH"]]


if __name__ == "__main__":  # for the shell scripts: `python modes.py SYNC_MODES` prints the list, space-separated
    import sys
    print(*globals()[sys.argv[1]])
