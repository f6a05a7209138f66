"""Shared, method-agnostic parts of the three training scripts.

Distributed setup and teardown, the flags all scripts share, ImageFolder / sample / synthetic data,
the model, one training-epoch loop with honest clocks, exact distributed evaluation, and the results
writer. The synchronization strategy of each method lives in its own script, never here.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "resnet50-0676ba61.pth"
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_VERSION = "v1"
SAMPLE_IMAGE_SIZE = 32  # default --image-size on the sample dataset, so a CPU run takes minutes
SAMPLE_TRAIN_PER_CLASS, SAMPLE_VAL_PER_CLASS = 96, 24
SAMPLE_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                  "hstripes", "vstripes", "diagonal", "checker", "dots")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UserError(Exception):
    """A mistake the user can fix: reported as one line `error: ...`, never as a traceback."""


# --------------------------------------------------------------------------- command line
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (and printed once, by rank 0) instead of usage + error."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def make_parser(description, default_output):
    """The parser every script starts from; scripts add only their own flags."""
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=_positive(int), default=3, help="training epochs")
    p.add_argument("--batch-size", type=_positive(int), default=64,
                   help="images per training step per training process")
    p.add_argument("--workers", type=_non_negative_int, default=16,
                   help="DataLoader worker processes per training process (capped to the CPUs each process has)")
    p.add_argument("--data-dir", default=None,
                   help="ImageFolder root holding train/ and val/; default ./ when ./train exists, "
                        "else the built-in sample dataset")
    p.add_argument("--synthetic", action="store_true",
                   help="train on in-memory random images (no decode, no disk) to measure sync cost alone; "
                        "accuracy is then meaningless")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="auto: NCCL on GPUs when each local process has one, else gloo on CPU")
    p.add_argument("--arch", default="resnet50", help="torchvision classification model")
    p.add_argument("--weights", default=None,
                   help=f"ImageNet weights file; default ./{WEIGHTS_FILE} or torch hub's cache, else random init")
    p.add_argument("--download-weights", action="store_true",
                   help="allow downloading torchvision's default weights when no local file is found")
    p.add_argument("--image-size", type=_positive(int), default=None,
                   help=f"training crop in pixels (default 224; {SAMPLE_IMAGE_SIZE} on the sample dataset)")
    p.add_argument("--lr", type=_positive(float), default=0.01,
                   help="SGD learning rate (suits fine-tuning ImageNet weights and the sample dataset)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation")
    p.add_argument("--max-steps", type=_positive(int), default=None,
                   help="cap on training steps per epoch (quick runs)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=1,
                   help="first steps of epoch 1 left out of throughput and step-time averages")
    p.add_argument("--amp", action="store_true", help="mixed precision autocast (see --amp-dtype)")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype with --amp; fp16 adds a GradScaler")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    p.add_argument("--timeout", type=_positive(float), default=10.0,
                   help="minutes a collective may wait for a peer before the run fails instead of hanging")
    p.add_argument("--log-every", type=_positive(int), default=10,
                   help="steps between progress-bar refreshes (each one is a host sync)")
    p.add_argument("--output", default=default_output, help="results JSON path")
    return p


def check_output_path(path):
    """Fail early, before any training, when the results file could not be written."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist (create it or change --output)")
    try:
        with open(folder / f".write-test-{os.getpid()}", "w"):
            pass
        os.remove(folder / f".write-test-{os.getpid()}")
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable: {e.strerror} (change --output)") from None


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args):
    """Reads torchrun's environment (or none: world size 1), sets the device, then joins the group."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if gpus >= local_world_size else "gloo"
    if backend == "nccl" and gpus < local_world_size:
        raise UserError(f"--backend nccl needs one GPU per process: {local_world_size} processes on this node "
                        f"but {gpus} GPU(s) found (lower --nproc_per_node to {gpus} or use --backend gloo)"
                        if gpus else "--backend nccl needs GPUs but CUDA found none (use --backend gloo)")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init_process_group, so NCCL binds the right GPU
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if "MASTER_ADDR" not in os.environ:  # plain `python script.py`: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=args.timeout),
                            device_id=device if backend == "nccl" else None)  # binds NCCL to this GPU
    return DistContext(rank, local_rank, world_size, local_world_size, device, backend, rank == 0)


def cleanup_distributed(barrier=False):
    """Leaves the process group if one was joined. `barrier` (end of a successful run): first wait until every
    rank is done, so no rank tears its connections down while a peer may still be reading from them."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def log(ctx, *parts, rank=0):
    """Prints on one rank only (rank 0 unless the method's owner of the output is another)."""
    if ctx.rank == rank:
        print(*parts, flush=True)


def print0(ctx, *parts):
    """Prints on rank 0 only."""
    log(ctx, *parts, rank=0)


def run_main(main):
    """Runs `main()`, turning user errors into one line and Ctrl-C into a short notice, both non-zero."""
    try:
        main()
    except UserError as e:
        _print_user_error(e)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: results written so far are kept, marked \"status\": \"incomplete\"",
                  file=sys.stderr)
        sys.exit(130)
    except (dist.DistError, RuntimeError) as e:
        if not _is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"[rank {os.environ.get('RANK', '0')}] error: communication with another process failed: a peer "
              f"died or stopped answering within --timeout ({first}); finished epochs are kept in the results "
              f"file, marked \"status\": \"incomplete\"", file=sys.stderr, flush=True)
        sys.exit(1)


def _is_peer_failure(e):
    """A collective that failed because another rank died or timed out (not a bug in this process)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out", "Broken pipe",
        "NCCL communicator was aborted", "Socket Timeout"))


_training_started = False  # setup errors are the same on every rank: only rank 0 reports them


def _print_user_error(e):
    # A UserError raised in a DataLoader worker is re-raised here with the worker's traceback in its
    # text: its last line is the message.
    line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    line = line.split("UserError: ", 1)[-1]
    rank = os.environ.get("RANK", "0")
    if rank == "0" or _training_started:
        where = f"[rank {rank}] " if _training_started and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{where}error: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data
def _sample_image(label, rng, size):
    """One learnable synthetic image: the class's shape or texture, random colour, placement and noise."""
    import numpy as np
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    period = rng.uniform(5, 9)
    phase = rng.uniform(0, period)
    name = SAMPLE_CLASSES[label]
    if name == "circle":
        mask = dy ** 2 + dx ** 2 < r ** 2
    elif name == "square":
        mask = (abs(dy) < r * 0.85) & (abs(dx) < r * 0.85)
    elif name == "triangle":
        mask = (dy < r * 0.8) & (dy > -r) & (abs(dx) < (dy + r) * 0.6)
    elif name == "cross":
        mask = ((abs(dy) < r * 0.3) & (abs(dx) < r)) | ((abs(dx) < r * 0.3) & (abs(dy) < r))
    elif name == "ring":
        mask = (dy ** 2 + dx ** 2 < r ** 2) & (dy ** 2 + dx ** 2 > (r * 0.6) ** 2)
    elif name == "hstripes":
        mask = ((yy + phase) % period) < period / 2
    elif name == "vstripes":
        mask = ((xx + phase) % period) < period / 2
    elif name == "diagonal":
        mask = ((xx + yy + phase) % period) < period / 2
    elif name == "checker":
        mask = (((xx + phase) // (period / 1.5) + (yy + phase) // (period / 1.5)) % 2) == 0
    else:  # dots
        mask = (((yy + phase) % period - period / 2) ** 2 + ((xx + phase) % period - period / 2) ** 2) < (period / 4) ** 2
    background, colour = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while abs(colour - background).sum() < 200:
        colour = rng.uniform(0, 255, 3)
    img = np.where(mask[..., None], colour, background) + rng.normal(0, 20, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def ensure_sample_dataset(root=SAMPLE_DIR):
    """Generates the built-in sample ImageFolder tree once (deterministic, seconds, no network); returns it."""
    import numpy as np
    from PIL import Image
    final = Path(root) / SAMPLE_VERSION
    if (final / "val").is_dir():
        return final
    tmp = Path(root) / f".tmp-{os.getpid()}-{socket.gethostname()}"
    rng = np.random.default_rng(1234)
    for split, per_class in (("train", SAMPLE_TRAIN_PER_CLASS), ("val", SAMPLE_VAL_PER_CLASS)):
        for label, name in enumerate(SAMPLE_CLASSES):
            folder = tmp / split / f"{label}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(_sample_image(label, rng, 48)).save(folder / f"{i:04d}.png")
    try:
        os.rename(tmp, final)  # atomic: a concurrent generator on a shared disk either wins or finds it done
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e} (remove or replace the file)") from None


@dataclasses.dataclass
class DataInfo:
    name: str
    root: str
    num_classes: int
    train_size: int
    val_size: int
    image_size: int


def resolve_data(args):
    """Picks the dataset: --data-dir (must be complete), else ./ when ./train exists, else the sample."""
    if args.data_dir is not None:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir {root} does not exist (pass the folder that holds train/ and val/)")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"--data-dir {root} has no {split}/ folder: {root / split} is missing "
                                f"(ImageFolder layout: {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
        return "imagefolder", root
    if Path("train").is_dir():
        if not Path("val").is_dir():
            raise UserError("./train exists but ./val is missing (add ./val or pass --data-dir)")
        return "imagefolder", Path(".")
    return "sample", None


def _image_folder(path, transform, ctx=None):
    """torchvision ImageFolder whose mistakes are one line; files that are not images are skipped, counted."""
    from torchvision import datasets
    skipped = []

    def is_image(file):
        ok = datasets.folder.has_file_allowed_extension(file, datasets.folder.IMG_EXTENSIONS)
        if not ok:
            skipped.append(file)
        return ok

    try:
        ds = datasets.ImageFolder(str(path), transform=transform, loader=_load_image, is_valid_file=is_image)
    except FileNotFoundError as e:
        raise UserError(f"{path}: {e} (each class needs its own folder of images)".replace("\n", " ")) from None
    if skipped and ctx is not None:
        print0(ctx, f"warning: skipped {len(skipped)} file(s) in {path} that are not images by their extension "
                    f"(e.g. {skipped[0]})")
    return ds


class ShardSampler(torch.utils.data.Sampler):
    """Every `num_replicas`-th index from `rank`, without the padding DistributedSampler adds (exact eval)."""

    def __init__(self, n, num_replicas, rank):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SyntheticLoader:
    """One random batch made once on the device and yielded `steps` times: no decode, no disk, no copy."""

    def __init__(self, batch_size, image_size, num_classes, steps, device, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.steps = steps
        self.sampler = None

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.targets)] * self.steps)


def build_data(args, ctx, num_replicas, replica_rank, load=True):
    """Train and val loaders for one replica (of `num_replicas`) plus a DataInfo describing the data.

    The PS server calls it with load=False: it needs the step count, not the images.
    """
    from torchvision import transforms
    kind, root = resolve_data(args)
    if kind == "sample":
        if ctx.local_rank == 0:
            ensure_sample_dataset()
        dist.barrier()
        root = SAMPLE_DIR / SAMPLE_VERSION
        if ctx.is_main:
            print(f"notice: no --data-dir and no ./train: using the built-in sample dataset "
                  f"({len(SAMPLE_CLASSES)} classes of synthetic shapes) at {root}", flush=True)
    size = args.image_size or (SAMPLE_IMAGE_SIZE if kind == "sample" else 224)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(int(round(size / 0.875))), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    train_set = _image_folder(Path(root) / "train", train_tf, ctx)
    val_set = _image_folder(Path(root) / "val", val_tf, ctx)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))[:5]
        only_val = sorted(set(val_set.classes) - set(train_set.classes))[:5]
        raise UserError(f"class folders differ between {root}/train and {root}/val "
                        f"(only in train: {only_train}, only in val: {only_val}); make them match")
    info = DataInfo(f"{'sample' if kind == 'sample' else 'imagefolder'}{' (synthetic)' if args.synthetic else ''}",
                    str(Path(root).resolve()), len(train_set.classes), len(train_set), len(val_set), size)
    shard = math.ceil(len(train_set) / num_replicas)
    if args.batch_size > shard:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {shard} training images each of the "
                        f"{num_replicas} training processes gets (lower --batch-size or use fewer processes)")
    steps = math.ceil(shard / args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    if not load:
        return None, None, info, steps
    if args.synthetic:
        train = SyntheticLoader(args.batch_size, size, info.num_classes, steps, ctx.device, args.seed + replica_rank)
    else:
        train = _loader(train_set, torch.utils.data.DistributedSampler(
            train_set, num_replicas, replica_rank, shuffle=True, seed=args.seed), args, ctx)
    val = _loader(val_set, ShardSampler(len(val_set), num_replicas, replica_rank), args, ctx)
    return train, val, info, steps


def _loader(dataset, sampler, args, ctx):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(args.workers, max(0, cpus // ctx.local_world_size - 1))  # leave the trainer its own core
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def to_device(images, targets, ctx, args):
    """Host batch to the training device (async on CUDA from pinned memory)."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return (images.to(ctx.device, non_blocking=True, memory_format=fmt),
            targets.to(ctx.device, non_blocking=True))


# --------------------------------------------------------------------------- model
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

    Seeded identically on every rank, so all replicas start from the same weights.
    """
    from torchvision import models
    torch.manual_seed(args.seed)
    try:
        # zero_init_residual (Goyal et al. 2017) lets a from-scratch ResNet train stably from its first
        # steps; loaded weights overwrite it.
        model = models.get_model(args.arch, weights=None, num_classes=1000, zero_init_residual=True)
    except TypeError:
        model = models.get_model(args.arch, weights=None, num_classes=1000)
    except ValueError:
        raise UserError(f"--arch {args.arch} is not a torchvision classification model (try resnet50)") from None
    path = find_weights(args)
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise UserError(f"--weights {path} is not a {args.arch} state dict "
                            f"({str(e).splitlines()[0][:120]})") from None
        source = str(path)
    elif args.download_weights:
        model = models.get_model(args.arch, weights="DEFAULT")
        source = "torchvision DEFAULT (downloaded)"
    else:
        source = "random init"
        print0(ctx, f"notice: no {WEIGHTS_FILE} found (--weights, ./, torch hub cache): starting from random init")
    if num_classes != 1000:
        _replace_head(model, num_classes)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
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


def autocast(args, ctx):
    """The forward pass's autocast context (a no-op without --amp)."""
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return torch.autocast(ctx.device.type, dtype=dtype, enabled=args.amp)


def make_scaler(args, ctx):
    """A GradScaler for --amp --amp-dtype fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(ctx.device.type, enabled=args.amp and args.amp_dtype == "fp16")


# --------------------------------------------------------------------------- timing and metrics
def synchronize(device):
    """Waits for the device's queued work, so a host clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Per-step phase timer: CUDA events on GPU (no host sync until read), perf_counter on CPU.

    `begin()` starts a step; each `mark(name)` closes the phase `name` that ran since the previous mark.
    """

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.steps = []

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self):
        self.steps.append([("begin", self._stamp())])

    def mark(self, name):
        self.steps[-1].append((name, self._stamp()))

    def phase_means(self, skip=0):
        """Mean seconds per step of each phase over the steps after the first `skip`."""
        synchronize(self.device)
        sums, steps = {}, self.steps[skip:]
        for marks in steps:
            for (_, a), (name, b) in zip(marks, marks[1:]):
                sums[name] = sums.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return {name: total / max(1, len(steps)) for name, total in sums.items()}


def all_reduce_sum(tensor, group=None):
    """In-place sum over `group` (a no-op for a group of one)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def run_epoch(ctx, args, epoch, loader, steps, train_step, *, log_rank=0, group=None, label="train"):
    """Runs one epoch of `train_step(images, targets, clock) -> (loss, logits)` and returns its metrics.

    Loss and accuracy accumulate on the device and are reduced over `group` once at the end; the bar
    reads them every --log-every steps. Steps before --warmup-steps (epoch 1 only) are left out of
    throughput and of the per-phase averages. Phase times: `data` is the wait for the next batch;
    the method's own marks name the rest.
    """
    from tqdm import tqdm
    global _training_started
    _training_started = True
    if getattr(loader, "sampler", None) is not None and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every replica
    warmup = min(args.warmup_steps, steps - 1) if epoch == 1 else 0
    clock = StepClock(ctx.device)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss_sum, correct: stay on the device
    seen = timed_seen = 0  # image counts are known on the host: no per-step host-to-device copy
    losses = []
    bar = tqdm(total=steps, desc=f"epoch {epoch} [{label}]", disable=ctx.rank != log_rank,
               dynamic_ncols=True, leave=False, file=sys.stdout)
    synchronize(ctx.device)
    t_start = t_timed = time.perf_counter()
    batches = iter(loader)
    for step in range(steps):
        if step == warmup and warmup:
            synchronize(ctx.device)
            t_timed = time.perf_counter()
        clock.begin()
        images, targets = next(batches)
        images, targets = to_device(images, targets, ctx, args)
        clock.mark("data")
        loss, logits = train_step(images, targets, clock)
        loss = loss.detach()
        n = targets.numel()
        sums += torch.stack([loss.double() * n, (logits.argmax(1) == targets).sum().double()])
        seen += n
        timed_seen += n if step >= warmup else 0
        losses.append(loss)
        if ctx.rank == log_rank and ((step + 1) % args.log_every == 0 or step + 1 == steps):
            loss_sum, correct = sums.tolist()  # host sync: once per --log-every steps
            check_finite(loss_sum, epoch, step)
            elapsed = time.perf_counter() - t_start
            replicas = dist.get_world_size(group) if dist.is_initialized() else 1
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%",
                            img_s=f"{seen * replicas / elapsed:.1f}")
        bar.update(1)
    synchronize(ctx.device)
    t_end = time.perf_counter()
    bar.close()
    phases = clock.phase_means(skip=warmup)
    totals = torch.cat([sums, torch.tensor([seen, timed_seen], dtype=torch.float64, device=ctx.device)])
    loss_sum, correct, seen, timed_seen = all_reduce_sum(totals, group).tolist()  # one reduction per epoch
    step_losses = torch.stack(losses).float().tolist()
    check_finite(loss_sum, epoch, steps - 1)
    timed = t_end - t_timed
    return {
        "epoch": epoch,
        "train_loss": loss_sum / seen,
        "train_accuracy": 100.0 * correct / seen,
        "train_time": t_end - t_start,
        "train_throughput": timed_seen / timed,
        "avg_batch_time": timed / (steps - warmup),
        "avg_data_time": phases.get("data", 0.0),
        "phase_times": phases,
        "steps": steps,
        "warmup_steps": warmup,
        "images_trained": int(seen),
        "all_losses": step_losses,
    }


def check_finite(loss_sum, epoch, step):
    """Stops the run with a clear message when the loss is NaN or inf."""
    if not math.isfinite(loss_sum):
        raise UserError(f"training loss became {loss_sum} in epoch {epoch} by step {step + 1} "
                        "(lower --lr, or try without --amp); results of finished epochs are kept")


@torch.no_grad()
def evaluate(model, loader, ctx, args, group=None):
    """Validation loss and accuracy over the whole val set, exact: every image counted exactly once."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss_sum, correct, count
    for images, targets in loader:
        images, targets = to_device(images, targets, ctx, args)
        with autocast(args, ctx):
            logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        sums[1] += (logits.argmax(1) == targets).sum()
        sums[2] += targets.numel()
    model.train()
    all_reduce_sum(sums, group)
    loss_sum, correct, count = sums.tolist()
    if count != len(loader.dataset):
        raise RuntimeError(f"evaluated {count} images but the val set has {len(loader.dataset)}")
    return loss_sum / count, 100.0 * correct / count


def median_time(fn, repeats, device, barrier=True):
    """Median wall time of `fn()` over `repeats` runs after one warm-up, device-synchronized."""
    times = []
    for _ in range(repeats + 1):
        if barrier and dist.is_initialized():
            dist.barrier()
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


@contextlib.contextmanager
def preserved_buffers(model):
    """Restores the model's buffers (BatchNorm running statistics) on exit: for steps that must not count."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


# --------------------------------------------------------------------------- results
def write_json_atomic(path, data):
    """Writes JSON to a temporary file in the same folder, then renames it: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


SUMMARY_AVERAGES = ("avg_comm_time", "avg_comm_time_pull", "avg_comm_time_push", "avg_comm_op_time",
                    "avg_data_time", "avg_batch_time", "avg_server_update_time")


class Results:
    """The results JSON in the guide's schema, rewritten atomically after every epoch.

    "status" stays "incomplete" until `finish()`, so a crash, a dead rank or Ctrl-C leaves valid JSON
    with the finished epochs, marked as such.
    """

    def __init__(self, path, method, ctx, args, info, writer, **extra):
        self.path, self.writer = path, writer
        self.data = {
            "method": method, "world_size": ctx.world_size, "batch_size": args.batch_size, **extra,
            "start_time": time.strftime("%Y-%m-%d %H:%M:%S"), "end_time": None, "status": "incomplete",
            "dataset": dataclasses.asdict(info), "arch": args.arch, "image_size": info.image_size,
            "device": device_name(ctx.device), "backend": ctx.backend, "torch_version": torch.__version__,
            "host": socket.gethostname(), "python": platform.python_version(), "args": vars(args),
            "epochs": [], "summary": {}, "all_losses": [],
        }
        if args.synthetic:
            self.data["accuracy_note"] = "synthetic data: random images and labels, so accuracy is meaningless"
        self.save()

    def add_epoch(self, record):
        self.data["epochs"].append(record)
        self.data["all_losses"].extend(record["all_losses"])
        self.data["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.data["summary"] = summarize(self.data["epochs"], self.data["summary"])
        self.save()

    def finish(self, **summary_extra):
        self.data["summary"].update(summary_extra)
        self.data["status"] = "complete"
        self.data["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()

    def save(self):
        if self.writer:
            write_json_atomic(self.path, self.data)


def summarize(epochs, previous=None):
    """The guide's summary fields (plus averages of whichever per-epoch timings the method records)."""
    summary = dict(previous or {})
    summary.update({
        "avg_train_throughput": statistics.mean(e["train_throughput"] for e in epochs),
        "avg_train_time_per_epoch": statistics.mean(e["train_time"] for e in epochs),
        "final_train_accuracy": epochs[-1]["train_accuracy"],
        "final_train_loss": epochs[-1]["train_loss"],
    })
    if "val_accuracy" in epochs[-1]:
        summary["best_val_accuracy"] = max(e["val_accuracy"] for e in epochs)
        summary["final_val_accuracy"] = epochs[-1]["val_accuracy"]
    for key in SUMMARY_AVERAGES:
        if key in epochs[-1]:
            summary[key] = statistics.mean(e[key] for e in epochs)
    return summary


def device_name(device):
    """A human name for the training device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def epoch_line(record):
    """The one-line per-epoch summary every script prints."""
    parts = [f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2f}%",
             f"{record['train_throughput']:.1f} img/s", f"{record['train_time']:.1f}s",
             f"step {1e3 * record['avg_batch_time']:.1f}ms (data {1e3 * record['avg_data_time']:.1f}ms)"]
    for key, label in (("avg_comm_time", "comm"), ("avg_comm_time_pull", "pull"), ("avg_comm_time_push", "push")):
        if key in record:
            parts.append(f"{label} {1e3 * record[key]:.1f}ms")
    if "val_accuracy" in record:
        parts.append(f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2f}%")
    return " | ".join(parts)


def warn_if_data_bound(ctx, record, log_rank=0, share=0.3):
    """One line when waiting for data takes more than `share` of a step: the loader, not sync, is measured."""
    if record["avg_batch_time"] > 0 and record["avg_data_time"] / record["avg_batch_time"] > share:
        log(ctx, f"warning: data loading is {100 * record['avg_data_time'] / record['avg_batch_time']:.0f}% "
                 "of each step, so this run measures the data loader more than synchronization "
                 "(raise --workers, or use --synthetic)", rank=log_rank)
