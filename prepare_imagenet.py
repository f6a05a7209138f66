"""ImageNet as it is downloaded, turned into the class folders --data-dir reads: DST/train/<wnid>/ and DST/val/<wnid>/.

    python prepare_imagenet.py SRC DST          # the same as: python data.py --prepare-imagenet SRC --root DST

SRC is one of the two ways ImageNet-1k (ILSVRC2012) comes:
  official  the folder holding ILSVRC2012_img_train.tar (one tar per class inside), ILSVRC2012_img_val.tar (50,000
            images in one flat folder) and ILSVRC2012_devkit_t12.tar.gz (the val labels: data/meta.mat and
            data/ILSVRC2012_validation_ground_truth.txt; reading meta.mat needs scipy). Any of the three may
            already be unpacked, as a folder of the same name without .tar / .tar.gz.
  Kaggle    the folder holding ILSVRC/Data/CLS-LOC/train/<wnid>/, the flat ILSVRC/Data/CLS-LOC/val/ and
            LOC_val_solution.csv (its PredictionString starts with the image's wnid).
Archives are extracted once, each class's tar streamed straight into its folder (the 140 GB outer tar is never
unpacked to disk); folders that are already unpacked are linked, not copied (hard links, else symlinks; copies only
where neither works). Resumable: a class is built under DST/.prepare-tmp/ and renamed into place when complete, so
a run that was interrupted, run again, redoes only the class it was in (val: only the images it had not written).
At the end it counts what DST holds and says whether that is the full set.
"""
import collections
import csv
import dataclasses
import errno
import io
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

from common import UserError, report_error

TRAIN_TAR, VAL_TAR, DEVKIT_TGZ = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
KAGGLE_DATA, KAGGLE_LABELS = Path("ILSVRC") / "Data" / "CLS-LOC", "LOC_val_solution.csv"
FULL_CLASSES, FULL_TRAIN, FULL_VAL = 1000, 1_281_167, 50_000
TMP = ".prepare-tmp"  # beside train/ and val/, never inside them: ImageFolder would take a hidden folder for a class
# torchvision's IMG_EXTENSIONS: what ImageFolder will read
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")
# errors that say the file system (or its rules, e.g. fs.protected_hardlinks) refuses a link, not that a file is missing
LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOSYS}


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- writing files
class Placer:
    """Puts an existing file at a new path: a hard link, else a symlink, else a copy. It steps down once, at the
    first refusal, and remembers why, so 1.3M files do not each retry a link the file system refuses."""
    KINDS = ("hard links", "symlinks", "copies")

    def __init__(self):
        self.level, self.refusals, self.counts = 0, [], collections.Counter()

    def place(self, source, target):
        while True:
            try:
                if self.level == 0:
                    os.link(source, target)
                elif self.level == 1:
                    os.symlink(os.path.abspath(source), target)
                else:
                    _copy(open(source, "rb"), target, str(source))
                self.counts[self.KINDS[self.level]] += 1
                return
            except OSError as e:
                if self.level == 2 or e.errno not in LINK_REFUSED:
                    raise UserError(f"cannot put {source} at {target}: {e.strerror} "
                                    f"(check that both exist and that {target.parent} is writable)") from None
                self.refusals.append(f"{self.KINDS[self.level]} failed: {e.strerror}")
                self.level += 1

    def summary(self, source_root):
        if not self.counts:
            return None
        done = ", ".join(f"{n:,} {kind}" for kind, n in self.counts.items())
        why = f" ({'; '.join(self.refusals)})" if self.refusals else ""
        if self.counts["copies"]:
            return f"linking failed{why}, so these files were COPIED: {done}"
        if self.counts["symlinks"]:
            return f"linked, not copied: {done}{why}; they point into {source_root}: keep it where it is"
        return f"linked, not copied: {done} (same file system: no extra space)"


def _copy(reader, target, what, at=None):
    """Writes `reader`'s bytes (`what`, or its member `at`) to `target` through a temporary name: a file under
    its final name is complete."""
    part = target.with_name(target.name + ".part")
    with reader:
        try:
            out = open(part, "wb")
        except OSError as e:
            raise UserError(f"cannot write {part}: {e.strerror} (check DST's permissions and free space)") from None
        with out:
            while True:
                try:
                    chunk = reader.read(1 << 20)
                except (OSError, EOFError, tarfile.TarError) as e:
                    raise UserError(f"{what} is damaged or truncated{' at ' + at if at else ''} ({e}) "
                                    "(download it again)") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:
                    raise UserError(f"cannot write {part}: {e.strerror} (free some space or choose "
                                    "another DST; run the same command again to continue)") from None
    os.replace(part, target)


def _member_name(member, archive):
    name = PurePosixPath(member.name).name  # images only: no member may write outside its folder
    if name in ("", ".", ".."):
        raise UserError(f"{archive} holds a file named {member.name!r} (download it again)")
    return name


def _extract_tar(tar, folder, what):
    """Streams every image of the (class) tar `tar` into `folder`; returns how many."""
    n = 0
    try:
        for member in tar:
            if member.isfile() and is_image(member.name):
                _copy(tar.extractfile(member), folder / _member_name(member, what), what, member.name)
                n += 1
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(f"{what} is damaged or truncated ({e}) (download it again)") from None
    return n


# --------------------------------------------------------------------------- what SRC holds
@dataclasses.dataclass
class TrainClass:
    wnid: str
    fill: object  # fill(folder, placer) -> images written into folder
    size: int  # bytes it writes (0 when linked)


@dataclasses.dataclass
class ValImage:
    name: str
    wnid: object  # str when the image's folder says it (val already sorted), else None: the labels say it
    put: object  # put(path, placer)
    size: int


class Source:
    """One ImageNet download: its train classes, its val images and their labels, read lazily (a 50,000-member
    val tar or the devkit are read only when val still has to be built)."""

    def __init__(self, layout, what, train, val, labels, opened=()):
        self.layout, self.what = layout, what
        self._train, self._val, self._labels = train, val, labels
        self._cache, self.opened = {}, opened  # the archives read from while building: closed at the end

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def train(self):
        return self._get("train", self._train)

    def val(self):
        return self._get("val", self._val)

    def labels(self):
        return self._get("labels", self._labels)

    def close(self):
        for archive in self.opened:
            archive.close()


def _tar(path, mode="r:"):
    try:
        return tarfile.open(path, mode)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(f"{path} is not a readable tar archive ({e}) (download it again)") from None


def _link_folder(folder, out, placer):
    n = 0
    for f in os.scandir(folder):
        if is_image(f.name):
            placer.place(f.path, out / f.name)
            n += 1
    return n


def _folder_train(folder):
    """An unpacked train folder: class folders (linked) or class tars (extracted)."""
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            classes[entry.name] = TrainClass(entry.name, lambda out, placer, path=entry.path: _link_folder(
                path, out, placer), 0)
        elif entry.is_file() and entry.name.endswith(".tar"):
            wnid, path = entry.name[:-4], Path(entry.path)
            if wnid in classes:
                continue

            def fill(out, placer, path=path):
                with _tar(path, "r|") as tar:
                    return _extract_tar(tar, out, str(path))
            classes[wnid] = TrainClass(wnid, fill, entry.stat().st_size)
    if not classes:
        raise UserError(f"{folder} holds no class folders and no class tars (expected <wnid>/ or <wnid>.tar "
                        "per class, e.g. n01440764/; pass the right SRC)")
    return classes


def _outer_train(path, opened):
    """The official train tar: one tar per class inside, each streamed from the outer tar (seeks past finished
    classes, so a resumed run does not read them again)."""
    outer = _tar(path)
    opened.append(outer)
    try:
        members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(f"{path} is damaged or truncated ({e}) (download it again)") from None
    if not members:
        raise UserError(f"{path} holds no class tars (expected n01440764.tar ... inside; is it {TRAIN_TAR}?)")
    classes = {}
    for m in members:
        wnid = PurePosixPath(m.name).name[:-4]

        def fill(out, placer, m=m):
            what = f"{path}: {m.name}"
            with tarfile.open(fileobj=outer.extractfile(m), mode="r|") as tar:
                return _extract_tar(tar, out, what)
        classes[wnid] = TrainClass(wnid, fill, m.size)
    return classes


def _folder_val(folder):
    """An unpacked val folder, flat (labels needed) or already sorted into class folders."""
    images = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and is_image(entry.name):
            images.append(ValImage(entry.name, None, lambda out, placer, p=entry.path: placer.place(p, out), 0))
        elif entry.is_dir() and not entry.name.startswith("."):
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if is_image(f.name):
                    images.append(ValImage(f.name, entry.name, lambda out, placer, p=f.path: placer.place(p, out), 0))
    if not images:
        raise UserError(f"{folder} holds no images (expected ILSVRC2012_val_00000001.JPEG ...; pass the right SRC)")
    return images


def _tar_val(path, opened):
    tar = _tar(path)
    opened.append(tar)
    try:
        members = [m for m in tar.getmembers() if m.isfile() and is_image(m.name)]
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(f"{path} is damaged or truncated ({e}) (download it again)") from None
    if not members:
        raise UserError(f"{path} holds no images (expected ILSVRC2012_val_00000001.JPEG ...; is it {VAL_TAR}?)")
    return [ValImage(_member_name(m, path), None,
                     lambda out, placer, m=m: _copy(tar.extractfile(m), out, str(path), m.name), m.size)
            for m in members]


def _devkit_labels(path):
    """{val image name: wnid} from the devkit: meta.mat maps ILSVRC2012_ID -> WNID, the ground truth gives each
    image's ILSVRC2012_ID in image order (what torchvision's parse_meta_mat / parse_val_groundtruth_txt read)."""
    meta_name, truth_name = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
    if path.is_dir():
        files = {}
        for name in (meta_name, truth_name):
            try:
                files[name] = (path / name).read_bytes()
            except OSError:
                raise UserError(f"{path / name} is missing (the devkit folder {DEVKIT_DIR}/ holds data/meta.mat and "
                                f"data/ILSVRC2012_validation_ground_truth.txt; unpack {DEVKIT_TGZ} again)") from None
    else:
        files = {}
        with _tar(path, "r:gz") as tar:
            try:
                for m in tar:
                    for name in (meta_name, truth_name):
                        if m.isfile() and m.name.endswith("/" + name):
                            files[name] = tar.extractfile(m).read()
            except (OSError, EOFError, tarfile.TarError) as e:
                raise UserError(f"{path} is damaged or truncated ({e}) (download it again)") from None
        for name in (meta_name, truth_name):
            if name not in files:
                raise UserError(f"{path} has no {DEVKIT_DIR}/{name} (is it {DEVKIT_TGZ}? download it again)")
    try:
        import scipy.io
    except ImportError:
        raise UserError("reading the devkit's meta.mat needs scipy (pip install scipy), or use the Kaggle "
                        "layout's LOC_val_solution.csv") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(files[meta_name]), squeeze_me=True)["synsets"]
        # the 1000 classes are the leaves (num_children 0); the other synsets are WordNet's inner nodes
        id_to_wnid = {int(i): str(w) for i, w, c in zip(synsets["ILSVRC2012_ID"], synsets["WNID"],
                                                         synsets["num_children"], strict=True) if int(c) == 0}
    except Exception as e:  # noqa: BLE001 - any unreadable meta.mat is the same user mistake
        raise UserError(f"{path}: cannot read {meta_name} ({type(e).__name__}: {e}) "
                        "(download the devkit again)") from None
    labels = {}
    for n, line in enumerate(files[truth_name].decode().split(), 1):
        if int(line) not in id_to_wnid:
            raise UserError(f"{path}: {truth_name} line {n} names class id {line}, which meta.mat lacks "
                            "(download the devkit again)")
        labels[f"ILSVRC2012_val_{n:08d}"] = id_to_wnid[int(line)]
    return labels


def _kaggle_labels(path):
    """{val image name: wnid} from LOC_val_solution.csv (ImageId,PredictionString; the string starts with the wnid)."""
    labels = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError, AttributeError):
                raise UserError(f"{path} line {len(labels) + 2} is not 'ImageId,PredictionString' with a wnid "
                                "(use the LOC_val_solution.csv of the Kaggle download)") from None
    return labels


def _either(src, tar_name, folder_name, what):
    """The archive or, when already unpacked, its folder."""
    if (src / folder_name).is_dir():
        return src / folder_name
    if (src / tar_name).is_file():
        return src / tar_name
    raise UserError(f"{src / tar_name} is missing (the official layout needs {what}: {tar_name}, or it unpacked "
                    f"as {folder_name}/; put it in {src})")


def detect(src):
    """What SRC holds: the official archives or the Kaggle copy (its folders and label file must all be there)."""
    if not src.is_dir():
        raise UserError(f"{src} is not a folder (pass the folder holding {TRAIN_TAR}, {VAL_TAR} and {DEVKIT_TGZ}, "
                        f"or the Kaggle folder holding ILSVRC/ and {KAGGLE_LABELS})")
    if (src / "ILSVRC").exists() or (src / KAGGLE_LABELS).exists():
        train, val, labels = src / KAGGLE_DATA / "train", src / KAGGLE_DATA / "val", src / KAGGLE_LABELS
        for path, what in ((train, "a folder per class"), (val, "the val images")):
            if not path.is_dir():
                raise UserError(f"{path} is missing (the Kaggle layout holds {what} there; pass the folder that "
                                "holds ILSVRC/ as SRC)")

        def kaggle_labels():
            if not labels.is_file():
                raise UserError(f"{labels} is missing (the Kaggle download's val labels; put it beside ILSVRC/)")
            return _kaggle_labels(labels)
        return Source("Kaggle", f"the Kaggle layout: {KAGGLE_DATA}/train/, {KAGGLE_DATA}/val/ and {labels.name} "
                                f"in {src}",
                      lambda: _folder_train(train), lambda: _folder_val(val), kaggle_labels)
    if not any((src / name).exists() for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TGZ, "ILSVRC2012_img_train",
                                                    "ILSVRC2012_img_val", DEVKIT_DIR)):
        if (src / "Data" / "CLS-LOC").is_dir():
            raise UserError(f"{src} is the Kaggle copy's ILSVRC/ folder (pass its parent, {src.parent}, which holds "
                            f"ILSVRC/ and {KAGGLE_LABELS})")
        if (src / "train").is_dir() and (src / "val").is_dir():
            raise UserError(f"{src} already holds train/ and val/ (if they hold class folders, train on it as it is: "
                            f"--data-dir {src})")
        raise UserError(f"{src} holds neither the official ImageNet files ({TRAIN_TAR}, {VAL_TAR}, {DEVKIT_TGZ}) nor "
                        f"the Kaggle copy (ILSVRC/Data/CLS-LOC/ and {KAGGLE_LABELS}) (pass the folder holding them)")
    train = _either(src, TRAIN_TAR, "ILSVRC2012_img_train", "the train images")
    val = _either(src, VAL_TAR, "ILSVRC2012_img_val", "the val images")
    devkit = (src / DEVKIT_DIR) if (src / DEVKIT_DIR).is_dir() else (src / DEVKIT_TGZ)

    def devkit_labels():
        if not devkit.exists():
            raise UserError(f"{src / DEVKIT_TGZ} is missing (the official layout's val labels are in the devkit, "
                            f"{DEVKIT_TGZ}; put it in {src})")
        return _devkit_labels(devkit)
    opened = []
    return Source("official", f"the official layout: {train.name}, {val.name} and {devkit.name} in {src}",
                  lambda: _folder_train(train) if train.is_dir() else _outer_train(train, opened),
                  lambda: _folder_val(val) if val.is_dir() else _tar_val(val, opened), devkit_labels, opened)


# --------------------------------------------------------------------------- counting
def count_split(folder):
    """{class: image files} of one split as ImageFolder finds them (every folder is a class, its images found
    recursively, following links), by file name, nothing decoded; and the files it would skip."""
    counts, others = {}, []
    for entry in os.scandir(folder):
        if not entry.is_dir():
            others.append(entry.path)
            continue
        n, folders = 0, [entry.path]
        while folders:
            # scandir's entries know their type without a stat, except links (followed: a dangling one is no image)
            for f in os.scandir(folders.pop()):
                if f.is_dir():
                    folders.append(f.path)
                elif is_image(f.name) and f.is_file():
                    n += 1
                else:
                    others.append(f.path)
        counts[entry.name] = n
    return counts, others


# --------------------------------------------------------------------------- preparing
class Progress:
    """A line every `every` seconds while a split is built (1000 classes: not a line each)."""

    def __init__(self, out, split, total, every=10.0):
        self.out, self.split, self.total, self.every = out, split, total, every
        self.start = self.last = time.monotonic()

    def tick(self, done, images, unit):
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = done / (now - self.start)
            left = f", about {(self.total - done) / rate / 60:.0f} min left" if rate > 0 else ""
            self.out(f"{self.split}: {done:,}/{self.total:,} {unit}, {images:,} images, "
                     f"{(now - self.start) / 60:.1f} min{left}")


def _writable(dst):
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"DST {dst} is not writable ({e.strerror}) (choose a folder you can write to)") from None


def _check_space(dst, need):
    free = shutil.disk_usage(dst).free
    if need > free:
        raise UserError(f"{dst} has {free / 1e9:.1f} GB free but extracting needs about {need / 1e9:.1f} GB more "
                        "(free some space or choose another DST)")


def build_train(source, dst, placer, out):
    classes = source.train()
    todo = [c for c in classes.values() if not (dst / "train" / c.wnid).is_dir()]
    if not todo:
        out(f"train: all {len(classes):,} classes already done")
        return classes
    done_before = len(classes) - len(todo)
    out(f"train: {len(todo):,} of {len(classes):,} classes to do" +
        (f" ({done_before:,} already finished by an earlier run)" if done_before else ""))
    _check_space(dst, sum(c.size for c in todo))
    (dst / "train").mkdir(exist_ok=True)
    progress, images = Progress(out, "train", len(todo)), 0
    for i, c in enumerate(todo, 1):
        tmp = dst / TMP / "train" / c.wnid
        if tmp.exists():  # an interrupted run's half-written class: redone from the start
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        n = c.fill(tmp, placer)
        if n == 0:
            raise UserError(f"train class {c.wnid} of {source.what} holds no images (download it again)")
        os.rename(tmp, dst / "train" / c.wnid)  # the class is complete once it has its final name
        images += n
        progress.tick(i, images, "classes")
    out(f"train: {len(todo):,} classes written, {images:,} images")
    return classes


def build_val(source, dst, train_classes, placer, out):
    if (dst / "val").is_dir():
        out("val: already done")
        return
    images = source.val()
    labels = source.labels() if any(im.wnid is None for im in images) else {}
    # both label files name an image without its extension (ILSVRC2012_val_00000001)
    unlabelled = [im.name for im in images if im.wnid is None and Path(im.name).stem not in labels]
    if unlabelled:
        raise UserError(f"{len(unlabelled):,} val image(s) have no label, e.g. {unlabelled[0]} (use the labels "
                        f"that came with these images: {source.what})")
    wnid_of = {im.name: im.wnid or labels[Path(im.name).stem] for im in images}
    strangers = sorted({w for w in wnid_of.values()} - set(train_classes))
    if strangers:
        example = next(name for name, w in wnid_of.items() if w == strangers[0])
        raise UserError(f"the val labels name {len(strangers)} class(es) with no train folder, e.g. {strangers[0]} "
                        f"(for {example}) (the train and val files must come from the same download)")
    tmp = dst / TMP / "val"
    for part in tmp.rglob("*.part") if tmp.is_dir() else ():
        part.unlink()  # an image an interrupted run was writing
    todo = [im for im in images if not (tmp / wnid_of[im.name] / im.name).exists()]
    out(f"val: {len(todo):,} of {len(images):,} images to do" +
        (f" ({len(images) - len(todo):,} already written by an earlier run)" if len(todo) < len(images) else ""))
    _check_space(dst, sum(im.size for im in todo))
    for wnid in set(wnid_of.values()):
        (tmp / wnid).mkdir(parents=True, exist_ok=True)
    progress = Progress(out, "val", len(todo))
    for i, im in enumerate(todo, 1):
        im.put(tmp / wnid_of[im.name] / im.name, placer)
        progress.tick(i, i, "images")
    os.rename(tmp, dst / "val")  # val is complete once it has its final name
    out(f"val: {len(images):,} images in {len(set(wnid_of.values())):,} class folders")


def verify(dst, out):
    """Counts what DST holds; raises unless train and val have the same, non-empty classes."""
    counts = {}
    for split in ("train", "val"):
        counts[split], others = count_split(dst / split)
        if others:
            raise UserError(f"{dst / split} holds {len(others):,} entries that are not images in class folders, e.g. "
                            f"{others[0]} (a dangling link or a stray file: remove it, and its class folder if it "
                            "is a link into a moved SRC, then run again)")
        empty = sorted(c for c, n in counts[split].items() if n == 0)
        if empty:
            raise UserError(f"{dst / split} has {len(empty)} empty class folder(s), e.g. {empty[0]} "
                            "(remove it and run again)")
    train, val = counts["train"], counts["val"]
    n_train, n_val = sum(train.values()), sum(val.values())
    out(f"train: {len(train):,} classes, {n_train:,} images")
    out(f"val:   {len(val):,} classes, {n_val:,} images")
    if set(train) != set(val):
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(f"train and val classes differ ({len(only_train)} only in train, e.g. {only_train[:3]}; "
                        f"{len(only_val)} only in val, e.g. {only_val[:3]}) (the train and val files must come "
                        "from the same download)")
    if (len(train), n_train, n_val) == (FULL_CLASSES, FULL_TRAIN, FULL_VAL):
        out(f"the full ImageNet-1k (ILSVRC2012) set: {FULL_CLASSES} classes, {FULL_TRAIN:,} train / {FULL_VAL:,} "
            "val images, train and val classes equal")
    else:
        out(f"NOT the full set (that is {FULL_CLASSES} classes, {FULL_TRAIN:,} train / {FULL_VAL:,} val images); "
            "train and val classes equal")
    return len(train), n_train, n_val


def prepare(src, dst, out=print):
    """Builds DST/train/<wnid>/ and DST/val/<wnid>/ from SRC (either layout); returns (classes, train, val)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    start = time.monotonic()
    source = detect(src)
    out(f"source: {source.what}")
    _writable(dst)
    out(f"destination: {dst}")
    placer = Placer()
    try:
        classes = build_train(source, dst, placer, out)
        build_val(source, dst, classes, placer, out)
    finally:
        source.close()
    shutil.rmtree(dst / TMP, ignore_errors=True)
    note = placer.summary(src)
    if note:
        out(note)
    result = verify(dst, out)
    out(f"ready in {time.monotonic() - start:.1f}s: train with --data-dir {dst}")
    return result


def run(src, dst):
    """prepare() for a command line: a user error is one line (exit 2), Ctrl-C says how to continue (130)."""
    try:
        prepare(src, dst, out=lambda line: print(line, flush=True))
    except UserError as e:
        report_error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: finished classes are kept; run the same command again to continue", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    from common import OneLineParser
    import argparse
    p = OneLineParser(description="Turn the ImageNet download (official archives or the Kaggle copy) into "
                                  "DST/train/<wnid>/ and DST/val/<wnid>/ for --data-dir DST.", epilog=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("src", metavar="SRC", help="the folder holding the download")
    p.add_argument("dst", metavar="DST", help="the folder to write train/ and val/ into")
    args = p.parse_args(argv)
    run(args.src, args.dst)


if __name__ == "__main__":
    main()
