"""Checks, in seconds, what a run would use and what would make it fail, before the run starts.

    bash run_all.sh --check                                   # with run_all.sh's own settings (NPROC, BACKEND, ...)
    python preflight.py --nproc 4 -- --data-dir /data/imagenet --backend nccl    # the flags the scripts would get

One line a check: `ok`, `warn` (the run works, but not as the guide intends) or `FAIL` (the run would fail; the line
says how to fix it), then a line summing up. Exit status 1 when anything FAILs, else 0. Checked: the GPUs and the
backend that follows (as common.setup_distributed chooses it), the packages, the flags every script would get, the
data (classes and images counted by file name, nothing decoded), the weights (common.find_weights), free disk space
where the results go, and the rendezvous (a single machine, a multi-node environment, or the emulated cluster).
"""
import argparse
import contextlib
import importlib.metadata
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUIDE_GPUS = 4  # the guide's "at least 4 GPUs"
MIN_FREE_GB = 2.0  # results, plots and logs take megabytes, but a --resume checkpoint of ResNet50 ~0.3 GB a method
SCRIPTS = ("baseline_multi_card", "all_reduce_train", "ps_train")
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "PET_NNODES", "PET_NODE_RANK",
                  "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_MASTER_ADDR", "PET_MASTER_PORT")


class Report:
    """The lines so far; `fix` is the part of a FAIL line that says what to do."""

    def __init__(self, out=print):
        self.out, self.counts = out, {"ok": 0, "warn": 0, "FAIL": 0}
        self.failed = []

    def line(self, status, topic, text, fix=None):
        self.counts[status] += 1
        if status == "FAIL":
            self.failed.append(topic)
        self.out(f"{status:<6}{topic}: {text}" + (f" ({fix})" if fix else ""))

    def ok(self, topic, text):
        self.line("ok", topic, text)

    def warn(self, topic, text, fix=None):
        self.line("warn", topic, text, fix)

    def fail(self, topic, text, fix):
        self.line("FAIL", topic, text, fix)


class Settings:
    """What the run would get: the process counts and launcher (from run_all.sh or the command line) and the flags
    every training script would get, parsed by the scripts' shared parser."""

    def __init__(self, opts, args):
        self.opts, self.args = opts, args
        self.run_all = opts.from_run_all
        self.counts = [opts.nproc, *[int(n) for n in opts.sweep.split()]]
        self.nodes, self.per_node = (opts.cluster if opts.cluster else (1, max(self.counts)))
        self.most = max(self.counts)  # the largest run decides what must be there

    def name(self, env, flag):
        """How the user sets a thing: run_all.sh's environment variable, or the scripts' flag."""
        return env if self.run_all else flag


# --------------------------------------------------------------------------- checks
def check_packages(report):
    """torch and torchvision at the floors requirements.txt states; what the guide's "install packages" adds."""
    floors = {}
    for line in (HERE / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_-]+)>=([0-9.]+)", line.strip())
        if m:
            floors[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split(".")[:2])
    found, missing, problems = [], [], []
    for package in ("torch", "torchvision", "numpy", "matplotlib", "tqdm", "pillow"):
        try:  # the installed version, read without importing (torchvision alone takes seconds to import)
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        m = re.match(r"(\d+)\.(\d+)", version)
        if package in floors and m and tuple(map(int, m.groups())) < floors[package]:
            problems.append(f"{package} {version} is older than {'.'.join(map(str, floors[package]))}")
        found.append(f"{package} {version}")
    usable = "torch" not in missing and "torchvision" not in missing
    if "torch" not in missing:
        try:
            import torch
            found[0] += f" ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"
        except ImportError as e:
            problems.append(f"torch is installed but does not import ({e})")
            usable = False
    if missing:
        problems.insert(0, f"not installed: {', '.join(missing)}")
    if problems:
        report.fail("packages", f"{'; '.join(problems)} for {sys.executable} (found: {', '.join(found) or 'none'})",
                    f"{sys.executable} -m pip install -r {HERE / 'requirements.txt'}")
        return usable
    report.ok("packages", f"{', '.join(found)} (python {sys.version.split()[0]}, {sys.executable})")
    return True


def check_gpus(report, s):
    """GPUs found and the backend setup_distributed would pick: NCCL when every local process has a GPU."""
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = None
    if shutil.which("nvidia-smi"):
        try:
            listed = sum(line.startswith("GPU ") for line in subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.splitlines())
        except (OSError, subprocess.SubprocessError):
            listed = None
    if listed and not gpus:
        report.warn("gpus", f"nvidia-smi lists {listed} GPU(s) but torch sees none"
                    + (" (a CPU-only torch build)" if not torch.version.cuda else ""),
                    "install torch's CUDA build (pytorch.org/get-started) or check CUDA_VISIBLE_DEVICES")
    local = s.per_node  # each node's local ranks take GPUs 0..per_node-1 (setup_distributed's rule)
    backend = s.args.backend
    chosen = ("nccl" if gpus >= local else "gloo") if backend == "auto" else backend
    how = f"{s.name('BACKEND=', '--backend ')}{backend}" if backend != "auto" else "chosen automatically"
    if chosen == "nccl" and gpus < local:
        gloo = s.name("BACKEND=gloo", "--backend gloo")
        fix = f"use {gloo}" if not gpus else f"lower {s.name('NPROC', '--nproc_per_node')} to {gpus} or use {gloo}"
        report.fail("gpus", f"{gpus} GPU(s) found, but {how} needs one GPU for each process, and {local} would run "
                    "on this machine", fix)
        return
    use = (f"{gpus} GPU(s) found: NCCL ({how}), one GPU for each of the {local} process(es) on this machine"
           if chosen == "nccl" else f"{gpus} GPU(s) found: gloo on CPU ({how}), {local} process(es) on this machine")
    if gpus < GUIDE_GPUS:
        report.warn("gpus", use, f"the guide expects {GUIDE_GPUS} GPUs; on fewer the comparison measures a "
                                 "smaller or CPU run")
    elif chosen == "gloo":
        report.warn("gpus", use, f"the GPUs stay unused: leave {s.name('BACKEND', '--backend')} unset for NCCL")
    elif chosen == "nccl" and s.opts.cluster and s.nodes > 1:
        report.warn("gpus", use, f"the {s.nodes} emulated nodes run on this machine and share its GPUs "
                                 f"0..{local - 1}: their timings are not a real cluster's")
    else:
        report.ok("gpus", use)


def check_arguments(report, s, argv):
    """Every script parses the flags it would get (EXTRA_ARGS go to all three)."""
    import common
    rejected = {}  # message -> the scripts that print it
    for script in SCRIPTS:
        err = io.StringIO()
        try:
            module = __import__(script)
            with contextlib.redirect_stderr(err):
                module.parse_args(list(argv))
        except SystemExit:
            message = re.sub(r" [(]see [^ ]+ --help[)]$", "", err.getvalue().strip().removeprefix("error: "))
            rejected.setdefault(message, []).append(f"{script}.py")
        except common.UserError as e:
            rejected.setdefault(str(e), []).append(f"{script}.py")
        except Exception as e:  # noqa: BLE001 - a script that cannot even be imported fails every run
            rejected.setdefault(f"cannot be imported ({type(e).__name__}: {e})", []).append(f"{script}.py")
    if rejected:
        report.fail("arguments", "; ".join(f"{'the three scripts' if len(who) == 3 else ' and '.join(who)}: {message}"
                                           for message, who in rejected.items()),
                    f"fix {s.name('EXTRA_ARGS', 'the flags')}; they go to all three scripts")
    else:
        report.ok("arguments", f"the three scripts accept: {' '.join(argv) or '(none)'}")


def check_data(report, s):
    """The data the scripts would pick (data.resolve_data's rules), counted by file name, nothing decoded."""
    a = s.args
    synthetic = (" (--synthetic: one random batch trains; this data sets the classes and the steps)"
                 if a.synthetic else "")
    if a.data_dir is not None:
        root, how = Path(a.data_dir), f"{s.name('DATA_DIR', '--data-dir')} {a.data_dir}"
        if not root.is_dir():
            return report.fail("data", f"{how} does not exist", "pass the folder that holds train/ and val/, e.g. "
                               "one made by: python data.py --prepare-imagenet SRC --root DIR")
    elif Path("train").is_dir():
        root, how = Path("."), "./train and ./val (no --data-dir)"
    else:
        import data
        present = (data.ROOT / data.VERSION / "val").is_dir()
        where = data.ROOT / data.VERSION
        if not present and not os.access(data.ROOT if data.ROOT.exists() else data.ROOT.parent, os.W_OK):
            return report.fail("data", f"the built-in sample dataset would be generated in {where}, which is not "
                               "writable", f"make {data.ROOT.parent} writable, or run python data.py --root DIR and "
                               f"pass {s.name('DATA_DIR', '--data-dir')} DIR")
        return _data_line(report, s, f"the built-in sample dataset ({len(data.CLASSES)} classes, "
                          f"{data.TRAIN_PER_CLASS} train / {data.VAL_PER_CLASS} val images each) at {where}, "
                          f"{'present' if present else 'generated on first use (seconds)'}{synthetic}",
                          len(data.CLASSES) * data.TRAIN_PER_CLASS)
    from prepare_imagenet import FULL_CLASSES, FULL_TRAIN, FULL_VAL, count_split
    counts, skipped = {}, []
    for split in ("train", "val"):
        if not (root / split).is_dir():
            return report.fail("data", f"{how}: {root / split} is missing", f"the ImageFolder layout is "
                               f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG; for the ImageNet "
                               "download: python data.py --prepare-imagenet SRC --root DIR")
        counts[split], others = count_split(root / split)
        if not counts[split]:
            return report.fail("data", f"{how}: {root / split} has no class folders",
                               f"put each class's images in {root / split}/<class>/")
        empty = sorted(c for c, n in counts[split].items() if n == 0)
        if empty:
            return report.fail("data", f"{how}: {len(empty)} empty class folder(s) in {root / split}, e.g. "
                               f"{empty[0]} (ImageFolder refuses a class without images)",
                               "remove them or fill them")
        skipped += others
    train, val = counts["train"], counts["val"]
    if set(train) != set(val):
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        return report.fail("data", f"{how}: train and val classes differ ({len(only_train)} only in train, e.g. "
                           f"{only_train[:3]}; {len(only_val)} only in val, e.g. {only_val[:3]})",
                           "make the class folders match")
    n_train, n_val = sum(train.values()), sum(val.values())
    full = (len(train), n_train, n_val) == (FULL_CLASSES, FULL_TRAIN, FULL_VAL)
    _data_line(report, s, f"{how}: {len(train):,} classes (the same in train and val), {n_train:,} train / {n_val:,} "
               f"val images{' (the full ImageNet-1k)' if full else ''}{synthetic}", n_train, skipped)


def _data_line(report, s, text, n_train, skipped=()):
    """The data's one line: FAIL when a batch is larger than a training process's share of the images (as
    data.open_data refuses it), warn when files will be skipped as not images, else ok."""
    shard = math.ceil(n_train / s.most)
    if s.args.batch_size > shard:
        report.fail("data", f"{text}; batch size {s.args.batch_size} is larger than the {shard} training images each "
                    f"of {s.most} processes gets", f"lower {s.name('BATCH_SIZE', '--batch-size')} or use fewer "
                    "processes")
    elif skipped:
        report.warn("data", f"{text}; {len(skipped):,} file(s) are not images in class folders and are skipped, e.g. "
                    f"{skipped[0]}", "remove them if they should not be there")
    else:
        report.ok("data", text)


def check_weights(report, s):
    """common.find_weights: --weights, ./resnet50-0676ba61.pth, torch hub's cache (resnet50 only), else random init;
    a file found is loaded into the model as build_model would, so a wrong file fails here, not after setup."""
    import torch
    import common
    a = s.args
    try:
        path = common.find_weights(a)
    except common.UserError as e:
        what, _, fix = str(e).rpartition(" (")
        return report.fail("weights", what, fix.rstrip(")"))
    if path is None:
        if a.download_weights:
            return report.warn("weights", f"no local {common.WEIGHTS_FILE}: torchvision's DEFAULT {a.arch} weights "
                               "will be downloaded (--download-weights)", "needs network access on every node")
        if a.arch != "resnet50":
            return report.ok("weights", f"random init (--arch {a.arch}: only resnet50 has a local weights file)")
        return report.warn("weights", f"no {common.WEIGHTS_FILE} (--weights, ./, {torch.hub.get_dir()}/checkpoints): "
                           "random init", f"the guide starts from ImageNet weights: put {common.WEIGHTS_FILE} in ./ "
                           "or pass --weights")
    from torchvision import models
    try:
        model = models.get_model(a.arch, weights=None, num_classes=1000)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file is the same mistake
        return report.fail("weights", f"{path} is not a {a.arch} state dict ({str(e).splitlines()[0][:120]})",
                           f"pass the torchvision {a.arch} weights file")
    report.ok("weights", f"{path} ({path.stat().st_size / 1e6:.0f} MB, loads into {a.arch})")


def check_disk(report, s):
    """Where results, plots and checkpoints go: writable, and free space above MIN_FREE_GB."""
    results = Path(s.opts.results_dir)
    existing = results
    while not existing.exists():
        existing = existing.parent
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK) or (existing != results and not existing.is_dir()):
        return report.fail("disk", f"results folder {results} cannot be written ({folder} is not a writable folder)",
                           f"choose another {s.name('RESULTS_DIR', '--results-dir')}")
    free = shutil.disk_usage(folder).free / 2 ** 30
    text = f"{free:.1f} GiB free where results{' and --resume checkpoints' if s.args.resume else ''} go ({results})"
    if free < s.opts.min_free_gb:
        report.warn("disk", text + f", under {s.opts.min_free_gb:g} GiB",
                    "results take megabytes, but a --resume checkpoint of ResNet50 ~0.3 GB per method and a full "
                    "disk ends a run mid-epoch: free some space")
    else:
        report.ok("disk", text)


def check_rendezvous(report, s):
    """A single machine, torchrun's multi-node environment, or the emulated cluster and what it needs."""
    if s.opts.cluster:
        problems = [f"'{tool}' not found (install iproute2, which provides ip and tc)"
                    for tool in ("ip", "tc") if not shutil.which(tool)]
        cap = 0
        with contextlib.suppress(OSError, StopIteration, ValueError):
            cap = int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                           if x.startswith("CapEff:")).split()[1], 16)
        if not (cap >> 12 & 1 and cap >> 21 & 1):  # CAP_NET_ADMIN and CAP_SYS_ADMIN, as emulate_cluster.sh checks
            problems.append("network namespaces and tc need root (run it as root, e.g. sudo bash run_all.sh ...)")
        what = (f"emulated cluster: {s.nodes} node(s) x {s.per_node} process(es) on {s.opts.link_rate or '1gbit'} "
                "links into one switch, torchrun's c10d rendezvous on node 0 (10.213.0.100)")
        if problems:
            return report.fail("rendezvous", what + ": " + "; ".join(p.split(" (")[0] for p in problems),
                               "; ".join(p.split(" (", 1)[1].rstrip(")") for p in problems))
        return report.ok("rendezvous", what + "; root, ip and tc are there")
    env = {k: os.environ[k] for k in RENDEZVOUS_ENV if os.environ.get(k)}
    if s.run_all:
        if env:
            return report.warn("rendezvous", f"{', '.join(f'{k}={v}' for k, v in env.items())} set, but run_all.sh "
                               "runs torchrun --standalone on this machine, which does not use them",
                               "for several machines run torchrun on each with --nnodes, --node-rank and "
                               "--rdzv-endpoint, or use --cluster to emulate them")
        return report.ok("rendezvous", "one machine: torchrun --standalone (a free local port)")
    if not env:
        return report.ok("rendezvous", "one machine (no MASTER_ADDR, NNODES or torchrun rendezvous variables set)")
    problems = []
    nnodes, rank = env.get("NNODES", env.get("PET_NNODES")), env.get("NODE_RANK", env.get("PET_NODE_RANK"))
    if nnodes is not None and not re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", nnodes):  # N or MIN:MAX
        problems.append(f"NNODES={nnodes} is not a node count")
    if rank is not None and not rank.isdigit():
        problems.append(f"NODE_RANK={rank} is not a node number")
    elif rank is not None and nnodes and nnodes.isdigit() and int(rank) >= int(nnodes):
        problems.append(f"NODE_RANK={rank} is not one of the nodes 0..{int(nnodes) - 1}")
    endpoint = env.get("PET_RDZV_ENDPOINT") or (f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
                                                if "MASTER_ADDR" in env else None)
    if endpoint:
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "29500")
        if not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"port {port!r} of {endpoint} is not a port number")
        try:
            socket.getaddrinfo(host.strip("[]"), None)
        except (OSError, UnicodeError):
            problems.append(f"host {host} of {endpoint} does not resolve")
    text = ", ".join(f"{k}={v}" for k, v in env.items())
    if problems:
        return report.fail("rendezvous", f"{text}: {'; '.join(problems)}", "fix the variables, or unset them for a "
                           "single machine")
    report.ok("rendezvous", text + (" (the rendezvous host resolves)" if endpoint else ""))


# --------------------------------------------------------------------------- command line
def cluster_shape(text):
    m = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not NODESxPROCS (e.g. 4x1)")
    return int(m.group(1)), int(m.group(2))


class Parser(argparse.ArgumentParser):
    """common.OneLineParser's behaviour without importing common (and torch): the packages check comes first."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def process_count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return int(text)


def parse(argv):
    p = Parser(prog="preflight.py", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Checks the setup of a run in seconds, before it starts; one line a check, exit 1 when "
                           "something would make the run fail.")
    p.add_argument("--nproc", type=process_count, default=4, help="training processes (torchrun's nproc_per_node)")
    p.add_argument("--sweep", default="", help="further process counts the run uses (run_all.sh --sweep)")
    p.add_argument("--results-dir", default=".", help="where results, plots and checkpoints go")
    p.add_argument("--cluster", type=cluster_shape, default=None, metavar="NODESxPROCS",
                   help="the run is on the emulated cluster (run_all.sh --cluster)")
    p.add_argument("--link-rate", default=None, help="the emulated cluster's link rate")
    p.add_argument("--min-free-gb", type=float, default=MIN_FREE_GB, help="warn under this much free disk space")
    p.add_argument("--from-run-all", action="store_true", help="word the fixes in run_all.sh's settings")
    p.add_argument("script_args", nargs=argparse.REMAINDER,
                   help="after --: the flags every training script would get")
    opts = p.parse_args(argv)
    script_args = opts.script_args[1:] if opts.script_args[:1] == ["--"] else opts.script_args
    for n in opts.sweep.split():
        if not n.isdigit() or int(n) < 1:
            p.error(f"--sweep '{opts.sweep}' is not a list of positive process counts")
    return opts, script_args


def script_settings(argv):
    """The shared flags as the scripts would parse them. When they do not parse (the arguments check says why), the
    other checks read them as plain strings, so that one bad flag does not hide the others' problems."""
    import common
    parser = common.make_parser("preflight")
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            pass
    lenient = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            if isinstance(action, argparse._StoreTrueAction):
                lenient.add_argument(*action.option_strings, dest=action.dest, action="store_true")
            else:
                lenient.add_argument(*action.option_strings, dest=action.dest, default=action.default)
    args = lenient.parse_known_args(argv)[0]
    try:
        args.batch_size = int(args.batch_size)
    except ValueError:
        args.batch_size = parser.get_default("batch_size")
    return args


def main(argv=None, out=print):
    """Runs every check; returns the exit status (1 when anything FAILed)."""
    opts, script_args = parse(sys.argv[1:] if argv is None else argv)
    report = Report(out)
    if not check_packages(report):
        out("preflight: torch and torchvision are needed for the other checks: install them, then run this again")
        return 1
    s = Settings(opts, script_settings(script_args))
    for check in (check_gpus, check_arguments, check_data, check_weights, check_disk, check_rendezvous):
        try:
            if check is check_arguments:
                check(report, s, script_args)
            else:
                check(report, s)
        except Exception as e:  # noqa: BLE001 - a check that breaks says so and the others still run
            report.fail(check.__name__.removeprefix("check_"), f"the check itself failed ({type(e).__name__}: {e})",
                        "report this; the run may still work")
    c = report.counts
    if report.failed:
        out(f"preflight: {c['FAIL']} problem(s) would make the run fail ({', '.join(report.failed)}): fix the FAIL "
            f"lines and check again ({c['ok']} ok, {c['warn']} warning(s))")
        return 1
    out(f"preflight: nothing would fail ({c['ok']} ok, {c['warn']} warning(s)"
        f"{': read the warn lines' if c['warn'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
