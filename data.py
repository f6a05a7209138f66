"""The data every method trains on: an ImageFolder (ImageNet) tree, the built-in sample dataset, or
--synthetic batches; sharded for the training processes, and exactly for evaluation.

    python data.py                   # generates the built-in sample dataset in sample_data/ (the scripts do it
                                     # on first use)
    python data.py --root DIR        # writes it as DIR/train and DIR/val: train on it with --data-dir DIR
    python data.py --prepare-imagenet SRC --root DST
                                     # the ImageNet download in SRC (the official archives or the Kaggle copy)
                                     # as DST/train/<wnid>/ and DST/val/<wnid>/ (prepare_imagenet.py)

The sample dataset is used when no --data-dir and no ./train exist, so the kit runs anywhere without a
download: 10 classes of synthetic shapes and textures (circle, square, ..., dots), each image one class's
shape or texture with a random colour, placement and size on a random background, plus noise.
Deterministic (fixed seed) and generated once, in seconds, with numpy and PIL.
"""
import argparse
import colorsys
import dataclasses
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import UserError, log

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROOT = Path(__file__).resolve().parent / "sample_data"
VERSION = "v2"
IMAGE_SIZE = 32  # default --image-size on the sample dataset, so that a CPU run takes minutes
TRAIN_PER_CLASS, VAL_PER_CLASS = 96, 24
CLASSES = ("circle", "square", "triangle", "cross", "ring",
           "hstripes", "vstripes", "diagonal", "checker", "dots")


def sample_image(label, rng, size=48):
    """One image of class `label` (uint8 HxWx3): its shape or texture, at a random place and size, in a colour
    whose hue hints at the class (each hue is shared by two neighbouring classes, so shape must decide), on a
    random background, with noise. Easy enough that ResNet-18 learns it from scratch in a few CPU minutes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    period = rng.uniform(8, 14.4)  # textures stay coarser than what a 32 px crop and ResNet's stem would blur
    phase = rng.uniform(0, period)
    masks = {
        "circle": lambda: dy ** 2 + dx ** 2 < r ** 2,
        "square": lambda: (abs(dy) < r * 0.85) & (abs(dx) < r * 0.85),
        "triangle": lambda: (dy < r * 0.8) & (dy > -r) & (abs(dx) < (dy + r) * 0.6),
        "cross": lambda: ((abs(dy) < r * 0.3) & (abs(dx) < r)) | ((abs(dx) < r * 0.3) & (abs(dy) < r)),
        "ring": lambda: (dy ** 2 + dx ** 2 < r ** 2) & (dy ** 2 + dx ** 2 > (r * 0.6) ** 2),
        "hstripes": lambda: ((yy + phase) % period) < period / 2,
        "vstripes": lambda: ((xx + phase) % period) < period / 2,
        "diagonal": lambda: ((xx + yy + phase) % period) < period / 2,
        "checker": lambda: (((xx + phase) // (period / 1.5) + (yy + phase) // (period / 1.5)) % 2) == 0,
        "dots": lambda: (((yy + phase) % period - period / 2) ** 2
                         + ((xx + phase) % period - period / 2) ** 2) < (period / 4) ** 2,
    }
    mask = masks[CLASSES[label]]()
    hue = (label + rng.uniform(-1, 1)) / len(CLASSES) % 1.0
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.6, 1)))
    background = rng.uniform(0, 255, 3)
    while abs(colour - background).sum() < 200:
        background = rng.uniform(0, 255, 3)
    img = np.where(mask[..., None], colour, background) + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def ensure(root=ROOT, versioned=True):
    """Generates the sample ImageFolder tree once (deterministic, seconds); returns the folder holding its train/
    and val/: `root`/VERSION (the scripts' cache, a new version beside an old one), or `root` itself when not
    `versioned` (so that --data-dir root reads it)."""
    from PIL import Image
    final = Path(root) / VERSION if versioned else Path(root)
    sample_classes = [f"{label}_{name}" for label, name in enumerate(CLASSES)]
    if (final / "val").is_dir() and (versioned or sorted(os.listdir(final / "val")) == sample_classes):
        return final
    if not versioned and ((final / "train").exists() or (final / "val").exists()):
        raise UserError(f"{final} already holds a train/ or val/ that is not the sample dataset (choose an empty "
                        "or new folder for --root)")
    tmp = Path(root) / f".tmp-{os.getpid()}-{socket.gethostname()}"
    rng = np.random.default_rng(1234)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = tmp / split / f"{label}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(sample_image(label, rng)).save(folder / f"{i:04d}.png")
    try:  # atomic: a concurrent generator on a shared disk either wins or finds it done
        if versioned:
            os.rename(tmp, final)
        else:
            os.rename(tmp / "train", final / "train")
            os.rename(tmp / "val", final / "val")  # last: a folder with val/ is complete
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- training and validation data
@dataclasses.dataclass
class DataInfo:
    name: str
    root: str
    num_classes: int
    train_size: int
    val_size: int
    image_size: int
    steps: int  # training (optimizer) steps per epoch; each trains on --accumulate micro-batches
    dropped_last_image: bool  # a shard's last batch would hold one image (BatchNorm cannot train on it)

    def describe(self):
        sizes = (f"{self.num_classes} classes, {self.train_size} train / {self.val_size} val images, "
                 f"{self.image_size}px")
        if self.name.endswith(" (synthetic)"):
            return f"one random batch (--synthetic) shaped like {self.name[:-12]} ({sizes})"
        return f"{self.name} ({sizes})"


@dataclasses.dataclass
class Datasets:
    info: DataInfo
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset


def resolve_data(args):
    """Picks the dataset: --data-dir (must be complete), else ./ when ./train exists, else the sample."""
    if args.data_dir is not None:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise UserError(f"--data-dir {root} does not exist (pass the folder that holds train/ and val/, or drop "
                            "--data-dir to use the built-in sample dataset)")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"--data-dir {root} has no {split}/ folder: {root / split} is missing "
                                f"(ImageFolder layout: {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg; "
                                "python data.py --prepare-imagenet turns the ImageNet download into it; or drop "
                                "--data-dir to use the built-in sample dataset)")
        return "imagefolder", root
    if Path("train").is_dir():
        if not Path("val").is_dir():
            raise UserError("./train exists but ./val is missing (add ./val or pass --data-dir)")
        return "imagefolder", Path(".")
    return "sample", None


def _load_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e} (remove or replace the file)") from None


def _image_folder(path, transform, ctx):
    """torchvision ImageFolder whose mistakes are one line; files that are not images are skipped, counted."""
    from torchvision import datasets
    skipped = []

    def is_image(file):
        ok = datasets.folder.has_file_allowed_extension(file, datasets.folder.IMG_EXTENSIONS)
        skipped.extend([] if ok else [file])
        return ok

    try:
        ds = datasets.ImageFolder(str(path), transform=transform, loader=_load_image, is_valid_file=is_image)
    except FileNotFoundError as e:
        raise UserError(f"{path}: {e} (each class needs its own folder of images)".replace("\n", " ")) from None
    if skipped:
        log(ctx, f"warning: skipped {len(skipped)} file(s) in {path} that are not images by their extension "
                 f"(e.g. {skipped[0]})")
    return ds


def open_data(args, ctx, replicas):
    """The datasets and their description for `replicas` training processes (every rank calls it)."""
    from torchvision import transforms
    kind, root = resolve_data(args)
    if kind == "sample":
        if ctx.local_rank == 0:
            root = ensure()
        dist.barrier()  # the other local ranks wait until the generator has finished
        root = ROOT / VERSION
        log(ctx, f"notice: --synthetic: random batches, with the class count and steps per epoch of the built-in "
                 f"sample dataset at {root}" if args.synthetic else
            f"notice: no --data-dir and no ./train: using the built-in sample dataset ({len(CLASSES)} classes of "
            f"synthetic shapes) at {root}")
    size = args.image_size or (IMAGE_SIZE if kind == "sample" else 224)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_set = _image_folder(Path(root) / "train", transforms.Compose([
        # The sample's shapes fill 20-45% of an image: its crops keep at least 35% (ImageNet's recipe: 8%).
        transforms.RandomResizedCrop(size, scale=(0.35 if kind == "sample" else 0.08, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]), ctx)
    val_set = _image_folder(Path(root) / "val", transforms.Compose([
        transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]), ctx)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))[:5]
        only_val = sorted(set(val_set.classes) - set(train_set.classes))[:5]
        raise UserError(f"class folders differ between {root}/train and {root}/val "
                        f"(only in train: {only_train}, only in val: {only_val}); make them match")
    shard = math.ceil(len(train_set) / replicas)
    if args.batch_size > shard:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {shard} training images each of the "
                        f"{replicas} training processes gets (lower --batch-size or use fewer processes)")
    full, rest = divmod(shard, args.batch_size)
    micro, k = full + (rest > 1), getattr(args, "accumulate", 1)
    if micro < k:
        raise UserError(f"--accumulate {k} needs {k} micro-batches per step but each of the {replicas} training "
                        f"processes has {micro} per epoch (lower --accumulate or --batch-size)")
    steps = min(micro // k, args.max_steps or math.inf)  # optimizer steps; the micro-batches past the last are left
    name = ("sample" if kind == "sample" else "imagefolder") + (" (synthetic)" if args.synthetic else "")
    info = DataInfo(name, str(Path(root).resolve()), len(train_set.classes), len(train_set), len(val_set), size,
                    steps, rest == 1)
    return Datasets(info, train_set, val_set)


class ShardSampler(torch.utils.data.Sampler):
    """Every `num_replicas`-th index from `rank`, without the padding DistributedSampler adds (exact eval)."""

    def __init__(self, n, num_replicas, rank):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler's shuffled shard, as (epoch, index) keys for SeededSamples, from position `start` on
    (an epoch continued after a restart starts where its checkpoint was taken)."""
    start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in super().__iter__()][self.start:])

    def __len__(self):
        return super().__len__() - self.start


class SeededSamples(torch.utils.data.Dataset):
    """Each sample's augmentation drawn from its own seed (the run's seed, the epoch, the index), not from a
    process's running RNG: the same images whichever DataLoader worker loads them, with any --workers, and after
    a restart in the middle of an epoch. The caller's RNG is left as it was."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2 ** 63)
            return self.dataset[index]


class SyntheticLoader:
    """One random batch made once on the device and yielded `steps` times: no decode, no disk, no copy."""

    def __init__(self, batch_size, image_size, num_classes, steps, device, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.steps, self.sampler = steps, None

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.targets)] * self.steps)


def train_loader(ds, args, ctx, replicas, replica_rank):
    """This replica's training batches: a shuffled shard, a new order each epoch (or --synthetic's batch)."""
    info = ds.info
    if args.synthetic:
        return SyntheticLoader(args.batch_size, info.image_size, info.num_classes, info.steps * args.accumulate,
                               ctx.device, args.seed + replica_rank)
    sampler = EpochSampler(ds.train_set, replicas, replica_rank, shuffle=True, seed=args.seed)
    return _loader(SeededSamples(ds.train_set, args.seed), sampler, args, ctx, drop_last=info.dropped_last_image)


def val_loader(ds, args, ctx, replicas, replica_rank):
    """This replica's share of the validation set, each image in exactly one share."""
    return _loader(ds.val_set, ShardSampler(len(ds.val_set), replicas, replica_rank), args, ctx)


def _loader(dataset, sampler, args, ctx, drop_last=False):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(args.workers, max(0, cpus // ctx.local_world_size - 1))  # leave the trainer its own core
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed))  # its workers' seeds: not drawn from the training RNG


def to_device(images, targets, ctx, args):
    """Host batch to the training device (async on CUDA from pinned memory)."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return (images.to(ctx.device, non_blocking=True, memory_format=fmt),
            targets.to(ctx.device, non_blocking=True))


def main(argv=None):
    """The command line: the sample dataset where --data-dir reads it, or the ImageNet download prepared."""
    import sys
    import textwrap
    from common import OneLineParser, report_error

    examples = "\n".join(line for line in __doc__.splitlines() if line.startswith(("    python", " " * 30)))
    parser = OneLineParser(prog="data.py", epilog="examples:\n" + examples, description=textwrap.fill(
        "Writes the built-in sample dataset (10 classes of synthetic shapes and textures, deterministic, in "
        "seconds), or turns the ImageNet download into class folders; train on either with --data-dir.", 100))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the examples keep their lines
    parser.add_argument("--root", metavar="DIR", default=None,
                        help="folder to write train/ and val/ into (default: the scripts' own cache, "
                             f"{ROOT.name}/{VERSION}, which they use when there is no --data-dir and no ./train)")
    parser.add_argument("--prepare-imagenet", metavar="SRC", default=None,
                        help="the folder holding the ImageNet download (the official ILSVRC2012 archives, or the "
                             "Kaggle copy): written as --root/train/<wnid>/ and --root/val/<wnid>/")
    args = parser.parse_args(argv)
    if args.prepare_imagenet is not None:
        if args.root is None:
            parser.error("--prepare-imagenet needs --root DST, the folder to write train/ and val/ into")
        import prepare_imagenet
        prepare_imagenet.run(args.prepare_imagenet, args.root)
        return
    try:
        path = ensure() if args.root is None else ensure(args.root, versioned=False)
    except UserError as e:
        report_error(str(e))
        sys.exit(2)
    print(f"sample dataset: {path} ({len(CLASSES)} classes, {TRAIN_PER_CLASS} train / {VAL_PER_CLASS} val each); "
          f"train on it with --data-dir {path}")


if __name__ == "__main__":
    main()
