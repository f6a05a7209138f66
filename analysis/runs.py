"""Runs and experiments: what a results file says, read in one place.

Every *.json in the results folder is looked at; its content, never its name first, says whether it is a results
file: the kit's (docs/results_schema.md, with a `kind`) or the guide's (GUIDE.md "Result files (JSON)": a `method`
text, no `kind`). A file that is not usable is named with the reason. The schema's defaults for settings an
older kit file lacks are in KIT_DEFAULTS and nowhere else; a guide-format file records none of those settings and
none of the kit's measurements, so they read None there ("not measured"), never a default. Runs that differ only
in their seed are one Experiment.
"""
import collections
import dataclasses
import json
import math
import re
import statistics
from pathlib import Path

import modes

from . import ranks, recovery
from .stats import estimate

# kind: the name shown in tables and plots, the script's variants (its default first: the ordering of rows)
KINDS = {"baseline_ddp": ("Baseline DDP", modes.COMM_HOOKS),
         "all_reduce": ("Manual All-Reduce", modes.SYNC_MODES),
         "ps": ("Parameter Server", modes.PS_COMMS)}
ALL_KINDS = tuple(KINDS)

# setting: (the kinds whose script has it, the value a kit file that lacks the field ran with)
KIT_DEFAULTS = {"comm_hook": (("baseline_ddp",), modes.COMM_HOOKS[0]),
                "sync": (("all_reduce",), modes.SYNC_MODES[0]),
                "compress": (("all_reduce",), modes.COMPRESSION[0]),
                "comm": (("ps",), modes.PS_COMMS[0]),
                "mode": (("ps",), modes.PS_MODES[0]),
                "servers": (("ps",), modes.PS_SERVERS[0]),
                "bucket_mb": (ALL_KINDS, modes.DEFAULT_BUCKET_MB)}

# What every epoch record must hold (the guide's own files have all of these).
EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time")

# figure (a Run property): (its words in the report's "not measured" lines, the kinds it applies to). A run whose
# property is None is named once for it; a new figure is one line here and one property in _RunFigures.
FIGURES = {
    "seed": ("seed", ALL_KINDS),
    "best_val_accuracy": ("validation accuracy", ALL_KINDS),
    "yardstick": ("communication overhead (the kit's yardstick)", ALL_KINDS),
    "scaling_efficiency": ("scaling efficiency", ALL_KINDS),
    "data_time": ("data-loading wait", ALL_KINDS),
    "throughput_se": ("step-time spread (step_time_stdev: the throughput's noise)", ALL_KINDS),
    "losses": ("per-step losses (all_losses)", ALL_KINDS),
    "comm_wait": ("all-reduce wait (own timer)", ("all_reduce",)),
    "comm_pull": ("pull time (own timer)", ("ps",)),
    "comm_push": ("push time (own timer)", ("ps",)),
    "rank_compute": ("per-rank compute (rank_compute: which rank held the others back)", ALL_KINDS),
    "ddp_timers": ("DDP's own communication timers (ddp_logging)", ("baseline_ddp",)),
}

# A results file is small (every step's loss of a long run is a few MB); a profiler trace can be 100+ MB.
PEEK_BYTES = 64 * 1024
READ_LIMIT_BYTES = 64 * 1024 * 1024


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _first_known(*values):
    return next((v for v in values if v is not None), None)


def _from_first(name):
    """An Experiment property: the first run's (every run of an experiment shares its settings)."""
    return property(lambda self: getattr(self.first, name))


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """The kit's communication yardstick (comm_overhead): a training step against the same step with no
    communication, on one fixed batch before epoch 1, in pairs. Seconds."""
    pairs: int
    step_time: float
    local_step_time: float
    overhead: float
    overhead_min: float
    overhead_max: float
    share: float
    blocking: float = None
    blocking_min: float = None
    blocking_max: float = None
    hidden_share: float = None
    overhead_se: float = None  # the standard error of the median over the pairs (kit files since issue 35)

    @classmethod
    def read(cls, d):
        if not isinstance(d, dict) or not all(_number(d.get(k)) for k in ("overhead", "overhead_min",
                                                                           "overhead_max", "step_time")):
            return None
        get = lambda k: float(d[k]) if _number(d.get(k)) else None  # noqa: E731
        share = get("overhead_share")
        return cls(pairs=d.get("pairs"), step_time=get("step_time"), local_step_time=get("local_step_time"),
                   overhead=get("overhead"), overhead_min=get("overhead_min"), overhead_max=get("overhead_max"),
                   share=share if share is not None else get("overhead") / get("step_time"),
                   blocking=get("blocking_overhead"), blocking_min=get("blocking_overhead_min"),
                   blocking_max=get("blocking_overhead_max"), hidden_share=get("hidden_share"),
                   overhead_se=get("overhead_se"))


@dataclasses.dataclass(frozen=True)
class DdpTimers:
    """DDP's own timers (epochs[].ddp_logging, from its _get_ddp_logging_data()): its averages over the iterations
    it samples since the run began, so the last epoch that records them holds the whole run's; seconds per step.
    comm: backward's communication (torch's reducer times it from the first bucket's all-reduce launch to the
    last one's end); overlap: the part of it before backward's compute ended."""
    comm: float
    compute: float
    overlap: float
    forward: float

    KEYS = {"comm": "avg_backward_comm_time", "compute": "avg_backward_compute_time",
            "overlap": "avg_backward_compute_comm_overlap_time", "forward": "avg_forward_compute_time"}

    @property
    def exposed(self):
        """The part of DDP's communication time not overlapped with backward compute."""
        return self.comm - self.overlap

    @classmethod
    def read(cls, epochs):
        records = [e["ddp_logging"] for e in epochs if isinstance(e.get("ddp_logging"), dict)
                   and all(_number(e["ddp_logging"].get(k)) for k in cls.KEYS.values())]
        if not records:
            return None
        return cls(**{name: float(records[-1][key]) for name, key in cls.KEYS.items()})


class _RunSettings:
    """Run's settings: how the run was made (its method's flags, its processes, its data and compute) and whether its
    accuracy means anything; read from self.data, for self.kind."""

    @property
    def guide_format(self):
        """Written in the guide's shape (no `kind`): none of the kit's settings or measurements are recorded."""
        return "kind" not in self.data

    def _setting(self, name):
        kinds, default = KIT_DEFAULTS[name]
        if self.kind not in kinds:
            return None
        if name in self.data:
            return self.data[name]
        return None if self.guide_format else default

    comm_hook = property(lambda self: self._setting("comm_hook"))
    sync = property(lambda self: self._setting("sync"))
    compress = property(lambda self: self._setting("compress"))
    comm = property(lambda self: self._setting("comm"))
    mode = property(lambda self: self._setting("mode"))
    servers = property(lambda self: self._setting("servers"))
    bucket_mb = property(lambda self: self._setting("bucket_mb"))
    world_size = property(lambda self: self.data["world_size"])
    batch_size = property(lambda self: self.data["batch_size"])
    epochs = property(lambda self: self.data["epochs"])
    network = property(lambda self: self.data.get("network") or None)
    backend = property(lambda self: self.data.get("backend"))
    args = property(lambda self: self.data.get("args") if isinstance(self.data.get("args"), dict) else {})

    @property
    def single_server(self):
        """A PS whose rank 0 only serves (the guide's PS, and the kit's default --servers 1)."""
        return self.kind == "ps" and self.servers != "all"

    @property
    def compressed(self):
        """Gradients compressed on the wire (a DDP comm hook or the all-reduce's --compress)."""
        return (self.comm_hook or "none") != "none" or (self.compress or "none") != "none"

    @property
    def asynchronous(self):
        return self.mode == "async"

    @property
    def trainers(self):
        """Processes that compute gradients: every one, except a single PS server (the guide's num_workers)."""
        if isinstance(self.data.get("trainers"), int):
            return self.data["trainers"]
        if self.kind != "ps":
            return self.world_size
        if isinstance(self.data.get("num_workers"), int):
            return self.data["num_workers"]
        return self.world_size - 1 if self.single_server else self.world_size

    @property
    def seed(self):
        seed = self.data.get("seed")
        return seed if seed is not None else self.args.get("seed")

    @property
    def status(self):
        """`status` as written; a file without one (the guide's) is complete when it has an end_time, and the
        guide's scripts write their file once, after training, so one without either is taken as complete too."""
        return self.data.get("status") or "complete"

    @property
    def completion_note(self):
        """Why a file without `status` is counted complete, or None."""
        if self.data.get("status"):
            return None
        return ("no status; end_time set: counted complete" if self.data.get("end_time") else
                "no status and no end_time: counted complete, as the guide's scripts write the file once, at the end")

    @property
    def complete(self):
        return self.status == "complete"

    @property
    def synthetic(self):
        """--synthetic: random images, so accuracy means nothing."""
        return bool(self.args.get("synthetic")) or "accuracy_note" in self.data

    @property
    def compute_model(self):
        """The compute model that stood in for the real compute (`compute_model`: its kind, label, spec, the
        modeled and the proxy batch), or None when the compute was real. Its throughput counts modeled images and
        its loss and accuracy are the proxy's: meaningless."""
        model = self.data.get("compute_model")
        return model if isinstance(model, dict) and model else None

    @property
    def compute_key(self):
        """What makes two runs' compute the same: None for real compute, else the compute model's spec (or label)."""
        model = self.compute_model
        if model is None:
            return None
        return str(model.get("spec") or model.get("label") or json.dumps(model, sort_keys=True))

    modeled = property(lambda self: self.compute_model is not None)

    @property
    def accuracy_void(self):
        """Why the run's accuracy means nothing ("synthetic", "modeled compute"), or None when it means something.
        A modeled run's loss means nothing too (the proxy's); a synthetic run's loss still shows learning."""
        return "modeled compute" if self.modeled else "synthetic" if self.synthetic else None


class _RunFigures:
    """Run's figures: the summary's value when it states one, else from the epochs; None when the file does not
    record it (FIGURES names the ones the report says are not measured)."""

    def _summary(self, key):
        summary = self.data.get("summary")
        value = summary.get(key) if isinstance(summary, dict) else None
        return float(value) if _number(value) else None

    def _epoch_mean(self, key):
        values = [e.get(key) for e in self.epochs]
        return statistics.mean(values) if values and all(_number(v) for v in values) else None

    def _metric(self, key, epoch_key=None):
        value = self._summary(key)
        return value if value is not None else self._epoch_mean(epoch_key or key)

    def _last(self, key):
        values = [e[key] for e in self.epochs if _number(e.get(key))]
        return float(values[-1]) if values else None

    throughput = property(lambda self: self._metric("avg_train_throughput", "train_throughput"))
    time_per_epoch = property(lambda self: self._metric("avg_train_time_per_epoch", "train_time"))
    batch_time = property(lambda self: self._metric("avg_batch_time"))
    data_time = property(lambda self: self._metric("avg_data_time"))
    scaling_efficiency = property(lambda self: self._metric("scaling_efficiency"))
    server_update = property(lambda self: self._metric("avg_server_update_time"))
    staleness_mean = property(lambda self: self._metric("staleness_mean"))
    staleness_max = property(lambda self: self._metric("staleness_max"))
    final_train_loss = property(lambda self: _first_known(self._summary("final_train_loss"), self._last("train_loss")))
    final_val_accuracy = property(lambda self: _first_known(self._summary("final_val_accuracy"),
                                                            self._last("val_accuracy")))
    comm_pull = property(lambda self: self._metric("avg_comm_time_pull") if self.kind == "ps" else None)
    comm_push = property(lambda self: self._metric("avg_comm_time_push") if self.kind == "ps" else None)
    comm_wait = property(lambda self: self._metric("avg_comm_time") if self.kind == "all_reduce" else None)

    @property
    def best_val_accuracy(self):
        value = self._summary("best_val_accuracy")
        values = [e["val_accuracy"] for e in self.epochs if _number(e.get("val_accuracy"))]
        return value if value is not None else (float(max(values)) if values else None)

    @property
    def comm_total(self):
        """The method's own communication timers summed: pull + push (PS), the wait (all-reduce)."""
        if self.kind == "ps":
            if self.comm_pull is not None and self.comm_push is not None:
                return self.comm_pull + self.comm_push
            return self._metric("avg_comm_time")
        return self.comm_wait

    @property
    def yardstick(self):
        return Yardstick.read(self.data.get("comm_overhead"))

    @property
    def gradient_bytes(self):
        return self.data.get("gradient_bytes")

    @property
    def wire_bytes(self):
        return self.data.get("wire_bytes_per_step")

    @property
    def state_bytes(self):
        return self.data.get("state_bytes")

    @property
    def throughput_se(self):
        """The standard error of the run's mean throughput from the step-to-step spread of its timed steps
        (epochs[].step_time_stdev over steps - warmup_steps steps), or None when a file lacks it. It measures the
        jitter inside one run, not the run-to-run variation that seeds show."""
        errors = []
        for e in self.epochs:
            timed = (e.get("steps") or 0) - (e.get("warmup_steps") or 0)
            if not (_number(e.get("step_time_stdev")) and timed >= 2 and e["avg_batch_time"] > 0):
                return None
            errors.append(e["train_throughput"] * e["step_time_stdev"] / math.sqrt(timed) / e["avg_batch_time"])
        return math.sqrt(sum(x * x for x in errors)) / len(errors) if errors else None

    @property
    def link(self):
        """(sent, received) bytes per step through the busiest node link, mean over epochs, or None."""
        links = [e.get("link") for e in self.epochs]
        if not links or not all(isinstance(x, dict) for x in links):
            return None
        return tuple(statistics.mean(x[f"{d}_bytes_per_step"] for x in links) for d in ("sent", "received"))

    @property
    def losses(self):
        """(positions in epochs, losses): each epoch's all_losses when every epoch has them (the guide's
        all-reduce file), else the top-level all_losses spread evenly over the epochs; None without either."""
        per_epoch = [e.get("all_losses") for e in self.epochs]
        if all(isinstance(p, list) and p for p in per_epoch):
            xs = [e["epoch"] - 1 + (i + 1) / len(p) for e, p in zip(self.epochs, per_epoch) for i in range(len(p))]
            return xs, [float(v) for p in per_epoch for v in p]
        flat = self.data.get("all_losses")
        if isinstance(flat, list) and flat:
            return [len(self.epochs) * (i + 1) / len(flat) for i in range(len(flat))], [float(v) for v in flat]
        return None

    @property
    def rank_compute(self):
        """Each trainer's own compute per step and the straggler named in it (ranks.RankCompute), or None."""
        return ranks.read(self.epochs)

    @property
    def ddp_timers(self):
        """DDP's own communication timers (DdpTimers), or None (not DDP, or not recorded)."""
        return DdpTimers.read(self.epochs) if self.kind == "baseline_ddp" else None

    @property
    def recovery(self):
        """Restarts and checkpoint cost (recovery.Recovery)."""
        return recovery.read(self.data)

    @property
    def profile(self):
        return next((e["profile"] for e in self.epochs if isinstance(e.get("profile"), dict)), None)

    def not_measured(self):
        """The words of every figure this kind of run has that the file does not record."""
        why = {"yardstick": " (only the kit's scripts measure it)" if self.guide_format else
               " (--overhead-pairs 0, or a resumed run)"}
        return [words + why.get(name, "") for name, (words, kinds) in FIGURES.items()
                if self.kind in kinds and getattr(self, name) is None]


@dataclasses.dataclass
class Run(_RunSettings, _RunFigures):
    """One results file. Settings and figures are properties (_RunSettings, _RunFigures); None means the file does
    not record it."""
    data: dict
    path: Path
    kind: str
    told_by: str  # how the method was recognised: "kind", "method" or "file name"


# --------------------------------------------------------------------------- reading files
def method_of(data, name):
    """(kind, how it was told) from the `kind` field, else the `method` text, else the file name; raises
    ValueError naming what was there."""
    if "kind" in data:
        if data["kind"] not in KINDS:
            raise ValueError(f"unknown method kind {data['kind']!r} (expected one of {', '.join(KINDS)})")
        return data["kind"], "kind"
    text = str(data.get("method") or "").lower()
    squashed = re.sub(r"[\s_\-]", "", text)
    if "parameterserver" in squashed or re.search(r"\bps\b", text):
        return "ps", "method"
    if "ddp" in squashed or "distributeddataparallel" in squashed:
        return "baseline_ddp", "method"
    if "allreduce" in squashed:
        return "all_reduce", "method"
    for kind in ("baseline_ddp", "all_reduce", "ps"):
        if re.fullmatch(rf"results_{kind}(_.*)?\.json", name):
            return kind, "file name"
    raise ValueError(f"unknown method: no kind, method {data.get('method')!r} names none of DDP, All-Reduce, "
                     "Parameter Server, and the file name is not results_{baseline_ddp,all_reduce,ps}*.json")


def peek(path):
    """Why the file is surely not a results file, judged from its size and first bytes (a profiler trace is
    never read in full), or None when it should be parsed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(PEEK_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff")
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "not valid JSON (an empty file)"
    start = head.lstrip()[:1]
    if '"traceEvents"' in head or '"schemaVersion"' in head:
        return "a profiler trace (traceEvents), not a results file"
    if start == "[":
        return "not a JSON object (a JSON array)"
    if start != "{":
        return f"not valid JSON (it starts with {head.lstrip()[:20]!r})"
    if size > READ_LIMIT_BYTES and not any(f'"{k}"' in head for k in ("method", "kind", "epochs")):
        return (f"not a results file: {size / 1e6:.0f} MB, and its first {PEEK_BYTES // 1024} KiB hold no method, "
                "kind or epochs field (not read in full)")
    return None


def load_run(path):
    """One results file as a Run; raises ValueError saying why it is not usable."""
    path = Path(path)
    reason = peek(path)
    if reason:
        raise ValueError(reason)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if not any(k in data for k in ("kind", "method", "epochs")):
        raise ValueError(f"not a results file (no method, kind or epochs field; it has {', '.join(list(data)[:4])})")
    kind, told_by = method_of(data, path.name)
    for key in ("world_size", "batch_size"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise ValueError(f"missing or invalid {key!r}")
    if not isinstance(data.get("epochs"), list) or not data["epochs"]:
        raise ValueError("no finished epoch")
    for i, e in enumerate(data["epochs"]):
        bad = [k for k in EPOCH_KEYS if not isinstance(e, dict) or not _number(e.get(k))]
        if bad:
            raise ValueError(f"epoch {i + 1} lacks valid {', '.join(bad)}")
    return Run(data, path, kind, told_by)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A JSON file of the folder that is not a usable results file, and why."""
    name: str
    why: str

    def __str__(self):
        return f"{self.name}: {self.why}"


def read_folder(folder):
    """([Run], [Skipped]) for every *.json in the folder, in name order."""
    runs, skipped = [], []
    for path in sorted(p for p in Path(folder).glob("*.json") if not p.is_dir()):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            skipped.append(Skipped(path.name, str(e)))
    return runs, skipped


# --------------------------------------------------------------------------- experiments
@dataclasses.dataclass
class Experiment:
    """The runs of one method and variant at one world size and batch, one per seed."""
    runs: list
    label: str = ""

    @property
    def first(self):
        return self.runs[0]

    kind, world_size, batch_size, trainers = map(_from_first, ("kind", "world_size", "batch_size", "trainers"))
    guide_format, synthetic, network = map(_from_first, ("guide_format", "synthetic", "network"))
    compute_model, compute_key, modeled, accuracy_void = map(_from_first, (
        "compute_model", "compute_key", "modeled", "accuracy_void"))
    comm_hook, sync, compress, comm, mode, servers, bucket_mb = map(_from_first, (
        "comm_hook", "sync", "compress", "comm", "mode", "servers", "bucket_mb"))
    single_server, compressed, asynchronous = map(_from_first, ("single_server", "compressed", "asynchronous"))
    gradient_bytes, wire_bytes, state_bytes = map(_from_first, ("gradient_bytes", "wire_bytes", "state_bytes"))
    variant = property(lambda self: variant_of(self.first))
    complete = property(lambda self: all(r.complete for r in self.runs))
    seeds = property(lambda self: [r.seed for r in self.runs])
    name = property(lambda self: KINDS[self.kind][0])

    def stat(self, figure):
        """The Estimate (mean, spread over seeds) of a Run figure, e.g. "throughput" or "yardstick.overhead";
        None when no run has it."""
        def get(run):
            value = run
            for part in figure.split("."):
                value = getattr(value, part) if value is not None else None
            return value
        return estimate([v for v in map(get, self.runs) if v is not None])

    def mean(self, figure):
        e = self.stat(figure)
        return None if e is None else e.mean


def run_label(x, run):
    """How one run of an experiment is named where figures are per run: the experiment's label, with the file
    name when the experiment has several seeds."""
    return x.label if len(x.runs) == 1 else f"{x.label} <{run.path.name}>"


def variant_of(run):
    """The settings that make a run another experiment than its script's default; "" for a guide-format file,
    which records none."""
    if run.guide_format:
        return ""
    if run.kind == "baseline_ddp":
        parts = [run.comm_hook]
    elif run.kind == "all_reduce":
        parts = [run.sync] + ([run.compress] if run.compress != "none" else [])
    else:
        parts = [run.comm] + (["async"] if run.asynchronous else []) + (["sharded"] if not run.single_server else [])
    if run.bucket_mb != modes.DEFAULT_BUCKET_MB and run.kind != "ps":
        parts.append(f"{run.bucket_mb:g} MiB buckets")
    return ", ".join(parts)


def short_key(key):
    """A compute model's key as a label shows it: a profile file by its name, a spec ("flops:20") as it is."""
    return Path(key).name if key.endswith(".json") else key


def group(runs):
    """Runs into labelled, ordered experiments: the same method, variant, world size, batch and file format
    are one experiment when their seeds differ."""
    groups = collections.defaultdict(list)
    for run in runs:
        key = (run.kind, variant_of(run), run.world_size, run.batch_size, run.guide_format, run.compute_key)
        # Two files of the same seed (or two without one) are two experiments, told apart by file name.
        slot = next((g for g in groups[key] if run.seed is not None and run.seed not in [r.seed for r in g]), None)
        if slot is None:
            groups[key].append([run])
        else:
            slot.append(run)
    experiments = [Experiment(sorted(g, key=lambda r: str(r.seed))) for gs in groups.values() for g in gs]

    def order(x):
        variants = KINDS[x.kind][1]
        base = x.variant.split(", ")[0]
        return (ALL_KINDS.index(x.kind), x.guide_format, variants.index(base) if base in variants else len(variants),
                x.variant, x.compute_key or "", x.world_size, x.first.path.name)
    experiments.sort(key=order)
    several_sizes = len({x.world_size for x in experiments}) > 1
    mixed = len({x.guide_format for x in experiments}) > 1
    models = {x.compute_key for x in experiments if x.modeled}
    for x in experiments:
        shown = [part for part in x.variant.split(", ") if part and part != "none"]  # DDP without a hook
        shown += ["guide file"] if x.guide_format and mixed else []
        # Named in every label, so every table row and sentence that uses the run says so.
        shown += [f"modeled compute{f' {short_key(x.compute_key)}' if len(models) > 1 else ''}"] if x.modeled else []
        x.label = x.name + (f" ({', '.join(shown)})" if shown else "")
        x.label += f" [{x.world_size} proc]" if several_sizes else ""
    counts = collections.Counter(x.label for x in experiments)
    for x in experiments:
        x.label += f" <{x.first.path.name}>" if counts[x.label] > 1 else ""
        x.label += f" ({len(x.runs)} seeds)" if len(x.runs) > 1 else ""
        x.label += "" if x.complete else " (incomplete)"
    return experiments


def load_folder(folder):
    """(experiments, [Skipped]) of a results folder."""
    runs, skipped = read_folder(folder)
    return group(runs), skipped


# --------------------------------------------------------------------------- relations between experiments
def same_compute(a, b):
    """Whether two experiments' compute is alike: both real, or the same compute model. A modeled run's throughput
    counts modeled images, so it is never set against a real run's as if it were one."""
    return a.compute_key == b.compute_key


def baseline_for(x, experiments):
    """The DDP experiment of the same world size that speedups are relative to: the kit's default (no hook,
    default buckets), else a guide-format DDP file; a complete one first."""
    ddps = [d for d in experiments if d.kind == "baseline_ddp" and d.world_size == x.world_size
            and d.variant in (KINDS["baseline_ddp"][1][0], "") and same_compute(d, x)]
    return min(ddps, key=lambda d: (not d.complete, d.guide_format)) if ddps else None


def twin_ddp(x, experiments):
    """The DDP doing this experiment's math: as many trainers, the same batch (a PS with N workers = DDP on N)."""
    twins = [d for d in experiments if d.kind == "baseline_ddp" and d.world_size == x.trainers
             and d.batch_size == x.batch_size and d.variant in (KINDS["baseline_ddp"][1][0], "") and same_compute(d, x)]
    return min(twins, key=lambda d: (not d.complete, d.guide_format)) if twins else None


def plain_variant(x, experiments):
    """The experiment a compressed or asynchronous one trades against: the same method and world size without
    the compression (same sync mode or bucket size) or synchronous (same --comm); None for the others."""
    if x.kind == "all_reduce" and x.compressed:
        same = lambda p: p.sync == x.sync and not p.compressed  # noqa: E731
    elif x.kind == "baseline_ddp" and x.compressed:
        same = lambda p: not p.compressed and p.bucket_mb == x.bucket_mb  # noqa: E731
    elif x.kind == "ps" and x.asynchronous:
        same = lambda p: p.mode == "sync" and p.comm == x.comm  # noqa: E731
    else:
        return None
    plain = [p for p in experiments if p.kind == x.kind and p.world_size == x.world_size and not p.guide_format
             and same_compute(p, x) and same(p)]
    return plain[0] if plain else None


def scaling_groups(experiments):
    """{(kind, variant, compute key): experiments by world size} where a variant ran at several world sizes (with
    the same compute: real, or one compute model)."""
    groups = collections.defaultdict(list)
    for x in experiments:
        groups[(x.kind, x.variant, x.guide_format, x.compute_key)].append(x)
    return {k[:2] + k[3:]: sorted(v, key=lambda x: x.world_size) for k, v in groups.items()
            if len({x.world_size for x in v}) > 1}


def cluster_groups(experiments):
    """{(kind, variant, processes per node, link rate, compute key): experiments by node count} for a method and
    variant run on a declared network (emulate_cluster.sh) at several node counts with the same processes per node,
    link rate and compute: the cost against the number of nodes."""
    groups = collections.defaultdict(list)
    for x in experiments:
        net = x.network or {}
        if x.guide_format or not net.get("link_rate_bits") or not isinstance(net.get("nodes"), int):
            continue
        key = (x.kind, x.variant, net.get("procs_per_node") or 1, net.get("link_rate") or "?", x.compute_key)
        groups[key].append(x)
    return {k: sorted(v, key=lambda x: (x.network["nodes"], x.world_size)) for k, v in groups.items()
            if len({x.network["nodes"] for x in v}) > 1}


def bucket_groups(experiments):
    """{(method name, world size): [(bucket MiB, experiment)]} for DDP and the overlap mode at several sizes."""
    groups = collections.defaultdict(list)
    for x in experiments:
        if (x.kind == "baseline_ddp" and x.comm_hook == "none") or \
                (x.kind == "all_reduce" and x.sync == "overlap" and x.compress == "none"):
            groups[(x.name + (" (modeled compute)" if x.modeled else ""), x.world_size)].append((x.bucket_mb, x))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if len(v) > 1}


__all__ = ["KINDS", "KIT_DEFAULTS", "FIGURES", "Yardstick", "Run", "Skipped", "Experiment", "load_run",
           "read_folder", "group", "run_label", "load_folder", "method_of", "peek", "variant_of", "baseline_for",
           "twin_ddp", "same_compute",
           "plain_variant", "scaling_groups", "cluster_groups", "bucket_groups", "DdpTimers"]
