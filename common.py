"""What every method builds itself from, and nothing method-specific: the command line and its one-line
errors, distributed setup, the model with its optimizer and learning-rate schedule, and flat buffers.

The rest has its own room: data.py (the data), measure.py (clocks, the epoch loop, evaluation, the yardstick,
link counters), driver.py (the loop every method runs), checkpoint.py, results.py (the results JSON, described
field by field in docs/results_schema.md). How a method synchronizes lives in its own script.
"""
import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

WEIGHTS_FILE = "resnet50-0676ba61.pth"


# --------------------------------------------------------------------------- command line and errors
class UserError(Exception):
    """A mistake the user can fix: reported as one line `error: ...`, never as a traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and each flag's default, when it has one worth saying."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line instead of usage + error; no abbreviated flags (--out is not --output)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        report_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


class Stopped(Exception):
    """Raised on every rank at the step the ranks agreed to stop at after SIGTERM or SIGINT (faults.py): one line,
    then exit 128 + the signal."""

    def __init__(self, signum, step, line):
        super().__init__(line)
        self.signum, self.step = signum, step


def positive(kind):
    """An argparse type: a number of `kind` that must be > 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative(kind):
    """An argparse type: a number of `kind` that must be >= 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def percent(text):
    """An argparse type: a percentage, > 0 and <= 100."""
    value = positive(float)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be a percentage up to 100, got {text}")
    return value


def make_parser(doc, default_output=None):
    """The flags every script shares; `doc` (the script's docstring) is what --help shows above them, and
    `default_output(args)` the results file when --output is not given. Each script adds its own flags and calls
    `parse(parser, argv)`."""
    p = OneLineParser(description=doc)
    p.default_output = default_output
    for add in (_add_run_args, _add_optimizer_args, _add_measure_args, _add_output_args):
        add(p)
    return p


def _add_run_args(p):
    """The run: epochs, batches, data, backend and model."""
    p.add_argument("--epochs", type=positive(int), default=3, help="training epochs")
    p.add_argument("--batch-size", type=positive(int), default=64, help="images per step per training process")
    p.add_argument("--accumulate", type=positive(int), default=1, metavar="K",
                   help="micro-batches of --batch-size per optimizer step, communication once per step (DDP's "
                        "no_sync() for the first K-1; the loss scaled by 1/K); a step is then K micro-batches")
    p.add_argument("--workers", type=non_negative(int), default=16,
                   help="DataLoader processes per training process (capped to the CPUs each process has)")
    p.add_argument("--data-dir", default=None, help="ImageFolder root holding train/ and val/; default ./ when "
                                                    "./train exists, else the built-in sample dataset")
    p.add_argument("--synthetic", action="store_true", help="train on one in-memory random batch (no decode, "
                                                            "no disk) to measure synchronization alone")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="auto: NCCL when each local process has a GPU, else gloo on CPU")
    p.add_argument("--arch", default="resnet50", help="torchvision classification model")
    p.add_argument("--weights", default=None,
                   help=f"ImageNet weights file; default ./{WEIGHTS_FILE} or torch hub's cache, else random init")
    p.add_argument("--download-weights", action="store_true",
                   help="allow downloading torchvision's default weights when no local file is found")
    p.add_argument("--image-size", type=positive(int), default=None,
                   help="training crop in pixels (default 224, or the built-in sample dataset's own size)")


def _add_optimizer_args(p):
    """SGD and its learning-rate schedule; the seed."""
    p.add_argument("--lr", type=positive(float), default=0.01, help="peak SGD learning rate")
    p.add_argument("--lr-scheduler", choices=("constant", "step", "cosine"), default="constant",
                   help="learning rate after warm-up: constant, x --lr-gamma every --lr-step-size epochs, or "
                        "cosine decay to --lr-min at the last step")
    p.add_argument("--lr-warmup-epochs", type=non_negative(float), default=0.0,
                   help="epochs (fractions allowed) of linear warm-up from --lr-warmup-decay x --lr")
    p.add_argument("--lr-warmup-decay", type=positive(float), default=0.01, help="warm-up's starting factor")
    p.add_argument("--lr-step-size", type=positive(int), default=30, help="epochs between decays (step)")
    p.add_argument("--lr-gamma", type=positive(float), default=0.1, help="decay factor (step)")
    p.add_argument("--lr-min", type=non_negative(float), default=0.0, help="final learning rate (cosine)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation")


def _add_measure_args(p):
    """What is timed and how: steps, the yardstick, profiling, precision, the compute model."""
    p.add_argument("--max-steps", type=positive(int), default=None, help="cap on training steps per epoch")
    p.add_argument("--warmup-steps", type=non_negative(int), default=1,
                   help="first steps of epoch 1 left out of throughput and step-time averages")
    p.add_argument("--overhead-pairs", type=non_negative(int), default=3,
                   help="pairs of steps with and without communication timed before epoch 1 to measure the "
                        "communication overhead (0: skip)")
    p.add_argument("--profile", type=non_negative(int), default=0,
                   help="steps of the first epoch to trace with torch.profiler after the warm-up (0: off): a "
                        "Chrome/Perfetto trace next to --output and how much communication overlapped compute")
    p.add_argument("--amp", action="store_true", help="mixed precision autocast (see --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype with --amp; fp16 adds a GradScaler")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    p.add_argument("--compute-model", default=None, metavar="SPEC",
                   help="model each layer's forward and backward as the time a device would take (a wait that leaves "
                        "the host CPU free), the real model running on a 2-image proxy; communication stays real: "
                        "flops:TFLOPS (torch's FLOP counter at that effective rate) or a profile recorded by "
                        "compute_model.py. Loss and accuracy are then meaningless; see compute_model.py")
    p.add_argument("--target-accuracy", type=percent, default=None, metavar="PERCENT",
                   help="stop at the end of the first epoch whose validation accuracy reaches PERCENT (every rank "
                        "stops there; the results are written as for a finished run) and record the training "
                        "time and steps it took in the results' time_to_target")
    p.add_argument("--timeout", type=positive(float), default=10.0,
                   help="minutes a collective may wait for a peer before the run fails instead of hanging")
    p.add_argument("--log-every", type=positive(int), default=10,
                   help="steps between progress updates (each is one host sync on every training rank)")


def _add_output_args(p):
    """The results file and the checkpoints."""
    p.add_argument("--output", default=None,
                   help="results JSON path; default results_<method>[_<variant>].json in the current folder, named "
                        "after the variant flags (a finished run already there is moved to previous/, not replaced)")
    p.add_argument("--resume", action="store_true",
                   help="write a checkpoint after every epoch (<output stem>.ckpt/, visible to every node) and, "
                        "when one exists, continue from it and its results file instead of starting over")
    p.add_argument("--checkpoint-every", type=non_negative(int), default=0, metavar="STEPS",
                   help="write a checkpoint every STEPS training steps (counted over the whole run) instead of "
                        "after each epoch. Checkpoints are written with --resume, with this flag, or under torchrun "
                        "--max-restarts, whose restarted processes continue from the latest one by themselves")


def parse(parser, argv):
    """Parses `argv`; --output defaults to the parser's `default_output(args)` (so it can follow a variant flag)."""
    args = parser.parse_args(argv)
    if args.target_accuracy is not None and (args.synthetic or args.compute_model):
        parser.error(f"--target-accuracy means nothing with {'--synthetic' if args.synthetic else '--compute-model'}"
                     " (its accuracy is meaningless): drop one of them")
    args.output = args.output or parser.default_output(args)
    return args


def check_output_path(path):
    """Fails early, before any training, when the results file could not be written."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist (create it or change --output)")
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable: {e.strerror} (change --output)") from None


def report_error(line):
    """Prints `error: line` once per job: the first rank to report wins, whichever rank it is (torchrun may
    kill the others as soon as one exits). Starts on a fresh line, below any progress bar."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and os.environ.get("WORLD_SIZE", "1") != "1":
        marker = Path(tempfile.gettempdir()) / (f"kit-error-{job}-{os.environ.get('MASTER_PORT', '')}-"
                                                 f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # no writable temp folder: better twice than never
    print(f"{chr(10) if sys.stderr.isatty() else ''}error: {line}", file=sys.stderr, flush=True)


# gloo's transport, once one operation has timed out, fails every other pending one with this, without the source
# path its other errors start with.
GLOO_PAIR_CLOSED = "Application timeout caused pair closure"


def is_peer_failure(e):
    """True when `e` says another process died or stopped answering: c10d's own errors (NCCL, the store,
    the network), or an error raised by gloo's transport layer (its message starts with that source file, or
    is its pair closure after a timeout)."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, dist.DistError):
            return True
        if isinstance(err, RuntimeError) and ("gloo/transport/" in str(err).split("]", 1)[0]
                                              or str(err).startswith(GLOO_PAIR_CLOSED)):
            return True
    return False


def run_main(main):
    """Runs `main()`: a user error is one line (exit 2), a dead peer one line (exit 1), a stop signal one line
    (143 SIGTERM, 130 SIGINT), Ctrl-C before training a notice (130).
    A run that finished under torchrun leaves with os._exit(0) once its output is flushed: at interpreter teardown
    a backend's C++ destructors have aborted a finished run ("terminate called without an active exception",
    seen once in ~20 runs), which made torchrun, and run_all.sh, report a failure after the results were written."""
    try:
        main()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as e:
        # A UserError raised in a DataLoader worker comes back with the worker's traceback in its text.
        text = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        report_error(text.split("UserError: ", 1)[-1])
        sys.exit(2)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{chr(10) if sys.stderr.isatty() else ''}{e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + e.signum)  # 143 for SIGTERM, 130 for SIGINT, as a shell reports a process the signal ended
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted: results written so far are kept, marked \"status\": \"incomplete\"",
                  file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - anything else is a bug and keeps its traceback
        if not is_peer_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        report_error(f"communication with another process failed: a peer died or stopped answering within "
                     f"--timeout (rank {os.environ.get('RANK', '0')}: {first}); finished epochs are kept in the "
                     f"results file, marked \"status\": \"incomplete\"")
        sys.exit(1)


# --------------------------------------------------------------------------- distributed setup
@dataclasses.dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str
    is_main: bool


def setup_distributed(args):
    """Reads torchrun's environment (or none: a group of one), sets the device, then joins the group."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size, local_world_size = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = ("nccl" if gpus >= local_world_size else "gloo") if args.backend == "auto" else args.backend
    shared = backend == "nccl" and 0 < gpus < local_world_size and os.environ.get("KIT_SHARE_GPU") == "1"
    if backend == "nccl" and gpus < local_world_size and not shared:
        raise UserError(f"--backend nccl needs one GPU per process: {local_world_size} processes on this node "
                        f"but {gpus} GPU(s) found (lower --nproc_per_node to {gpus}, set KIT_SHARE_GPU=1 to let "
                        f"processes share a GPU, or use --backend auto or gloo)"
                        if gpus else "--backend nccl needs GPUs but CUDA found none (use --backend auto or gloo: "
                                     "the kit then runs on the CPU)")
    if shared:
        _nccl_host_of_its_own(local_rank)
    device = torch.device("cuda", local_rank % gpus) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init_process_group, so NCCL binds the right GPU
        torch.backends.cudnn.benchmark = True
    if "MASTER_ADDR" not in os.environ:  # plain `python script.py`: a group of one on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    timeout = datetime.timedelta(minutes=args.timeout)
    dist.init_process_group(backend, store=_attempt_store(timeout), rank=rank, world_size=world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    ctx = DistContext(rank, local_rank, world_size, local_world_size, device, backend, rank == 0)
    if shared and local_rank == 0:
        print(f"notice: {local_world_size} processes share {gpus} GPU(s) on this node (KIT_SHARE_GPU=1): NCCL "
              f"connects them through its socket transport, as it would separate machines", flush=True)
    return ctx


def _nccl_host_of_its_own(local_rank):
    """Makes this process a host of its own to NCCL, so that processes may share a GPU (KIT_SHARE_GPU=1).

    NCCL refuses two ranks of one host on one GPU ("Duplicate GPU detected"; from 2.30 "Multiple Ranks are using the
    same GPU"), and it tells hosts apart by NCCL_HOSTID (default: the host name and boot id), which a process reads
    at its first communicator: so here, before init_process_group. Ranks of different hosts never use NCCL's shared
    memory or peer-to-peer (PCIe, NVLink) transports between them, only its network transport: sockets here."""
    host = os.environ.get("NCCL_HOSTID")  # set per node by emulate_cluster.sh; else this machine's identity
    if not host:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        host = f"{socket.gethostname()}-{boot}"
    os.environ["NCCL_HOSTID"] = f"{host}-rank{local_rank}"


def _attempt_store(timeout):
    """Under a torchrun that restarts failed groups (--max-restarts), the store the agent serves for this attempt,
    under a prefix of its own: torchrun's c10d rendezvous keeps one store (and MASTER_PORT) across restarts, so
    a restarted group would otherwise read the dead group's addresses (gloo: "failed to connect ... Connection
    refused", seen on every restart here). None (torch's env:// as usual) elsewhere."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"kit/attempt{attempt}", agent)


def cleanup_distributed(barrier=False):
    """Leaves the group. `barrier` (a successful end): first wait for every rank, so none closes a
    connection a peer still reads."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def log(ctx, *parts, rank=0):
    """Prints on one rank only (rank 0, or the rank that owns the output, e.g. the PS's first worker)."""
    if ctx.rank == rank:
        print(*parts, flush=True)


def first_rank(group):
    """The lowest global rank of `group` (None: the whole world): it reports for the group."""
    return 0 if group is None else min(dist.get_process_group_ranks(group))


# --------------------------------------------------------------------------- model, optimizer, schedule
def find_weights(args):
    """The local ImageNet weights file to use, or None for random init."""
    if args.weights:
        if not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights} does not exist (pass the path to {WEIGHTS_FILE})")
        return Path(args.weights)
    if args.arch != "resnet50":
        return None
    for candidate in (Path(WEIGHTS_FILE), Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    return None


def build_model(args, ctx, num_classes):
    """torchvision `--arch`, ImageNet weights when available, head resized to the dataset's classes.
    Seeded identically on every rank, so all replicas start from the same weights."""
    from torchvision import models
    torch.manual_seed(args.seed)
    try:  # zero_init_residual (Goyal et al. 2017) lets a from-scratch ResNet train from its first steps
        model = models.get_model(args.arch, weights=None, num_classes=1000, zero_init_residual=True)
    except TypeError:
        model = models.get_model(args.arch, weights=None, num_classes=1000)
    except ValueError:
        raise UserError(f"--arch {args.arch} is not a torchvision classification model (try resnet50)") from None
    path = find_weights(args)
    if path is not None:
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file is the same user mistake
            raise UserError(f"--weights {path} is not a {args.arch} state dict "
                            f"({str(e).splitlines()[0][:120]})") from None
        source = str(path)
    elif args.download_weights:
        model, source = models.get_model(args.arch, weights="DEFAULT"), "torchvision DEFAULT (downloaded)"
    else:
        source = "random init"
        log(ctx, f"notice: no {WEIGHTS_FILE} found (--weights, ./, torch hub cache): starting from random init"
            if args.arch == "resnet50" else f"notice: no --weights for --arch {args.arch}: starting from random init")
    if num_classes != 1000:
        _replace_head(model, num_classes)
    model.to(ctx.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    return model, source


def _replace_head(model, num_classes):
    for owner, name in ((model, "fc"), (getattr(model, "classifier", None), None), (getattr(model, "heads", None), "head")):
        if owner is None:
            continue
        if name is None:  # nn.Sequential classifier: its last Linear
            idx = max(i for i, m in enumerate(owner) if isinstance(m, nn.Linear))
            owner[idx] = nn.Linear(owner[idx].in_features, num_classes)
            return
        if isinstance(getattr(owner, name, None), nn.Linear):
            setattr(owner, name, nn.Linear(getattr(owner, name).in_features, num_classes))
            return
    raise UserError(f"cannot find the classifier head of --arch {type(model).__name__} to resize it")


def make_optimizer(args, params):
    """SGD with momentum and weight decay: the same update for all three methods."""
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(args, progress):
    """The learning rate `progress` epochs into training (0 at the first step): linear warm-up, then constant,
    step or cosine, as torchvision's reference recipes do but evaluated every step. The same for all methods."""
    warm = args.lr_warmup_epochs
    if progress < warm:
        return args.lr * (args.lr_warmup_decay + (1 - args.lr_warmup_decay) * progress / warm)
    if args.lr_scheduler == "step":
        return args.lr * args.lr_gamma ** int((progress - warm) // args.lr_step_size)
    if args.lr_scheduler == "cosine":
        done = min(1.0, (progress - warm) / max(1e-12, args.epochs - warm))
        return args.lr_min + (args.lr - args.lr_min) * (1 + math.cos(math.pi * done)) / 2
    return args.lr


def micro_batches(images, targets):
    """A step's micro-batches as [(images, targets)]: one batch is a list of one; --accumulate K gives lists of K."""
    if isinstance(images, (list, tuple)):
        return list(zip(images, targets))
    return [(images, targets)]


def accumulated(losses, logits):
    """A step's loss (the mean of its micro-batches' losses: what the 1/K-scaled backwards summed) and its logits,
    concatenated, detached: what the epoch loop counts."""
    return sum(loss.detach() for loss in losses) / len(losses), torch.cat([out.detach() for out in logits])


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(args, ctx):
    """The forward pass's autocast context (a no-op without --amp)."""
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return torch.autocast(ctx.device.type, dtype=dtype, enabled=args.amp)


def make_scaler(args, ctx):
    """A GradScaler for --amp --amp-dtype fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(ctx.device.type, enabled=args.amp and args.amp_dtype == "fp16")


# --------------------------------------------------------------------------- flat buffers
def split_buckets(tensors, bucket_bytes, same_dtype=True):
    """Consecutive runs of `tensors` of at most `bucket_bytes` each (a larger tensor alone), and of one dtype
    unless `same_dtype` is False (for buffers that carry every dtype as float32)."""
    buckets, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or size + nbytes > bucket_bytes or (same_dtype and t.dtype != buckets[-1][-1].dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


def flat_by_dtype(tensors):
    """One FlatBuffer per dtype among `tensors` (their order kept within each)."""
    groups = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return [FlatBuffer(group) for group in groups.values()]


class FlatBuffer:
    """One contiguous buffer laid out like `tensors`: `views[i]` has tensor i's shape AND strides (as DDP's
    bucket views do), so a channels-last tensor's gradient stays channels-last and copies keep memory order."""

    def __init__(self, tensors, dtype=None):
        self.tensors = list(tensors)
        self.flat = torch.zeros(sum(t.numel() for t in self.tensors), dtype=dtype or self.tensors[0].dtype,
                                device=self.tensors[0].device)
        self.views, offset = [], 0
        for t in self.tensors:
            self.views.append(self.flat.as_strided(t.shape, torch.empty_like(t).stride(), offset))
            offset += t.numel()

    @torch.no_grad()
    def pack(self, sources=None):
        torch._foreach_copy_(self.views, list(self.tensors if sources is None else sources))
        return self.flat

    @torch.no_grad()
    def unpack(self, targets=None):
        torch._foreach_copy_(list(self.tensors if targets is None else targets), self.views)


# --------------------------------------------------------------------------- where it runs
def device_name(device):
    """A human name for the training device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def comm_stream(device, stream=None):
    """A communication thread's CUDA stream, `stream` or a new one (nothing on a CPU): its waits for a collective hold
    back that stream, never the one training computes on. Call it in the thread that uses it."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.cuda.set_device(device)
    return torch.cuda.stream(stream or torch.cuda.Stream(device))
