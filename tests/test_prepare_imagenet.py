"""prepare_imagenet.py on tiny fabricated copies of both ImageNet layouts (3 classes, a few 8 px JPEGs): the tree
it builds, linking instead of copying, an interrupted run finished by a rerun that redoes nothing done, each bad
input's one line, and that --data-dir accepts the result; data.py's command line (--root, --help)."""
import io
import os
import runpy
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

import data
import prepare_imagenet as prep
from dist_helpers import REPO, cli_args, cpu_ctx, error_lines

WNIDS = ("n01440764", "n01443537", "n01484850")
IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # ILSVRC2012_ID order differs from the wnids' on purpose
TRAIN_PER_CLASS = 4
VAL_LABELS = ["n01443537", "n01440764", "n01484850", "n01484850", "n01440764", "n01443537"]  # image i's class


def jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def train_name(wnid, i):
    return f"{wnid}_{1000 + i}.JPEG"


def val_name(i):
    return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def class_tar(wnid, truncate_after=None):
    """A class's tar as the official train tar holds it; `truncate_after` cuts it inside its next image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(TRAIN_PER_CLASS):
            add(tar, train_name(wnid, i), jpeg(WNIDS.index(wnid) * 10 + i))
            if i + 1 == truncate_after:
                cut = buf.tell() + 600
    payload = buf.getvalue()
    return payload if truncate_after is None else payload[:cut]


def write_train_tar(src, broken=None):
    with tarfile.open(src / prep.TRAIN_TAR, "w") as outer:
        for wnid in WNIDS:
            add(outer, f"{wnid}.tar", class_tar(wnid, truncate_after=2 if wnid == broken else None))


def meta_mat():
    """A devkit meta.mat: the leaves (num_children 0) are the classes; an inner WordNet node is not."""
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    synsets = np.zeros((len(IDS) + 1, 1), dtype=[(f, "O") for f in fields])
    rows = [(i, w, 0) for w, i in IDS.items()] + [(1001, "n00000001", 3)]
    for k, (i, wnid, children) in enumerate(rows):
        synsets[k, 0] = (np.array([[i]], dtype=np.uint16), np.array([wnid]), np.array(["a, b"]), np.array(["g"]),
                         np.array([[children]], dtype=np.uint8), np.zeros((1, 0)), np.array([[0]]), np.array([[5]]))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def make_official(src, broken=None):
    """The three official files in `src`; class `broken`'s tar cut short inside its third image."""
    src.mkdir(parents=True, exist_ok=True)
    write_train_tar(src, broken)
    with tarfile.open(src / prep.VAL_TAR, "w") as tar:
        for i in range(len(VAL_LABELS)):
            add(tar, val_name(i), jpeg(500 + i))
    with tarfile.open(src / prep.DEVKIT_TGZ, "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        truth = "".join(f"{IDS[w]}\n" for w in VAL_LABELS)
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
    return src


def make_kaggle(src, labels=VAL_LABELS):
    data_dir = src / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid in WNIDS:
        (data_dir / "train" / wnid).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            (data_dir / "train" / wnid / train_name(wnid, i)).write_bytes(jpeg(WNIDS.index(wnid) * 10 + i))
    (data_dir / "val").mkdir()
    for i in range(len(VAL_LABELS)):
        (data_dir / "val" / val_name(i)).write_bytes(jpeg(500 + i))
    rows = [f"{val_name(i)[:-5]},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in enumerate(labels)]
    (src / prep.KAGGLE_LABELS).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return src


def run(capsys, src, dst):
    """prepare_imagenet's command line in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        prep.main([str(src), str(dst)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def check_tree(dst):
    """DST holds exactly the fabricated images, each val image in its labelled class, bytes unchanged."""
    for wnid in WNIDS:
        assert sorted(p.name for p in (dst / "train" / wnid).iterdir()) == [train_name(wnid, i) for i in range(4)]
        assert (dst / "train" / wnid / train_name(wnid, 1)).read_bytes() == jpeg(WNIDS.index(wnid) * 10 + 1)
    assert sorted(p.name for p in (dst / "train").iterdir()) == list(WNIDS)
    assert sorted(p.name for p in (dst / "val").iterdir()) == list(WNIDS)
    for i, wnid in enumerate(VAL_LABELS):
        assert (dst / "val" / wnid / val_name(i)).read_bytes() == jpeg(500 + i)
    assert sum(1 for _ in (dst / "val").rglob("*.JPEG")) == len(VAL_LABELS)
    assert sorted(p.name for p in dst.iterdir()) == ["train", "val"]  # no temporary folder left


def snapshot(folder):
    return {p.relative_to(folder): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- the two layouts
def test_official_archives_become_class_folders(tmp_path, capsys):
    src, dst = make_official(tmp_path / "download"), tmp_path / "imagenet"
    code, out, err = run(capsys, src, dst)
    assert code == 0, err
    check_tree(dst)
    assert f"source: the official layout: {prep.TRAIN_TAR}, {prep.VAL_TAR} and {prep.DEVKIT_TGZ} in {src}" in out
    assert "train: 3 classes, 12 images" in out and "val:   3 classes, 6 images" in out
    assert "NOT the full set (that is 1000 classes, 1,281,167 train / 50,000 val images)" in out
    assert not any(p.is_symlink() or p.stat().st_nlink > 1 for p in dst.rglob("*.JPEG"))  # extracted: own files


def test_kaggle_copy_is_linked_not_copied(tmp_path, capsys):
    src, dst = make_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    code, out, err = run(capsys, src, dst)
    assert code == 0, err
    check_tree(dst)
    assert ("source: the Kaggle layout: ILSVRC/Data/CLS-LOC/train/, ILSVRC/Data/CLS-LOC/val/ and "
            f"LOC_val_solution.csv in {src}") in out
    assert "linked, not copied: 18 hard links (same file system: no extra space)" in out
    original = src / "ILSVRC/Data/CLS-LOC"
    assert (dst / "train" / WNIDS[0] / train_name(WNIDS[0], 0)).stat().st_ino == \
        (original / "train" / WNIDS[0] / train_name(WNIDS[0], 0)).stat().st_ino
    assert (dst / "val" / VAL_LABELS[0] / val_name(0)).samefile(original / "val" / val_name(0))


def test_the_full_set_is_named_as_such(tmp_path, monkeypatch):
    """The check that says "the full set" compares the counts with ImageNet-1k's (here made the tiny set's)."""
    src, dst = make_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    prep.prepare(src, dst, out=lambda line: None)
    monkeypatch.setattr(prep, "FULL_CLASSES", 3)
    monkeypatch.setattr(prep, "FULL_TRAIN", 12)
    monkeypatch.setattr(prep, "FULL_VAL", 6)
    lines = []
    assert prep.verify(dst, lines.append) == (3, 12, 6)
    assert lines[-1] == "the full ImageNet-1k (ILSVRC2012) set: 3 classes, 12 train / 6 val images, train and val " \
                        "classes equal"


def test_across_file_systems_the_links_are_symlinks(tmp_path, capsys):
    """/dev/shm is a tmpfs: a hard link from there into tmp_path fails (EXDEV), so the files are symlinked."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "this test needs /dev/shm on another file system"
        src, dst = make_kaggle(Path(shm) / "kaggle"), tmp_path / "imagenet"
        code, out, err = run(capsys, src, dst)
        assert code == 0, err
        check_tree(dst)
        assert "linked, not copied: 18 symlinks (hard links failed: Invalid cross-device link)" in out
        link = dst / "val" / VAL_LABELS[0] / val_name(0)
        assert link.is_symlink() and Path(os.readlink(link)) == src / "ILSVRC/Data/CLS-LOC/val" / val_name(0)


def test_already_unpacked_official_val_folder_is_linked(tmp_path, capsys):
    src = make_official(tmp_path / "download")
    (src / prep.VAL_TAR).unlink()  # unpacked by hand: the flat folder the tar holds
    (src / "ILSVRC2012_img_val").mkdir()
    for i in range(len(VAL_LABELS)):
        (src / "ILSVRC2012_img_val" / val_name(i)).write_bytes(jpeg(500 + i))
    code, out, err = run(capsys, src, tmp_path / "imagenet")
    assert code == 0, err
    check_tree(tmp_path / "imagenet")
    assert "linked, not copied: 6 hard links" in out


# --------------------------------------------------------------------------- resuming
def test_an_interrupted_preparation_is_finished_by_a_rerun_that_redoes_nothing_done(tmp_path, capsys):
    src, dst = make_official(tmp_path / "download", broken=WNIDS[2]), tmp_path / "imagenet"
    code, out, err = run(capsys, src, dst)  # the last class's tar breaks off inside its third image
    assert code == 2 and error_lines(err) == [err.strip()]
    assert f"{prep.TRAIN_TAR}: {WNIDS[2]}.tar is damaged or truncated at {train_name(WNIDS[2], 2)}" in err
    assert sorted(p.name for p in (dst / "train").iterdir()) == list(WNIDS[:2])  # the finished classes, only
    assert len(list((dst / prep.TMP / "train" / WNIDS[2]).iterdir())) >= 2  # the half-written one, not in train/
    assert not (dst / "val").exists()
    finished = snapshot(dst / "train")

    write_train_tar(src)  # the archive downloaded again; the same command again
    code, out, err = run(capsys, src, dst)
    assert code == 0, err
    check_tree(dst)
    assert "train: 1 of 3 classes to do (2 already finished by an earlier run)" in out
    after = snapshot(dst / "train")
    assert {k: v for k, v in after.items() if k in finished} == finished  # not one file rewritten
    done = snapshot(dst)

    code, out, err = run(capsys, src, dst)  # complete: nothing to do, nothing touched
    assert code == 0, err
    assert "train: all 3 classes already done" in out and "val: already done" in out
    assert snapshot(dst) == done


def test_an_interrupted_val_keeps_the_images_written(tmp_path, capsys):
    """A val image is written under a temporary name and renamed: a rerun keeps the finished ones, redoes the rest."""
    src, dst = make_official(tmp_path / "download"), tmp_path / "imagenet"
    first = dst / prep.TMP / "val" / VAL_LABELS[0] / val_name(0)
    first.parent.mkdir(parents=True)
    first.write_bytes(jpeg(500))  # what a killed run left: one image finished, one half-written
    (dst / prep.TMP / "val" / VAL_LABELS[1]).mkdir()
    (dst / prep.TMP / "val" / VAL_LABELS[1] / (val_name(1) + ".part")).write_bytes(b"\xff\xd8")
    inode = first.stat().st_ino
    code, out, err = run(capsys, src, dst)
    assert code == 0, err
    check_tree(dst)
    assert "val: 5 of 6 images to do (1 already written by an earlier run)" in out
    assert (dst / "val" / VAL_LABELS[0] / val_name(0)).stat().st_ino == inode


# --------------------------------------------------------------------------- bad input: one line, exit 2
def _no_label(src):
    make_kaggle(src, labels=VAL_LABELS[:-1])


def _unknown_class(src):
    make_kaggle(src, labels=VAL_LABELS[:-1] + ["n09999999"])


def _no_val_tar(src):
    make_official(src)
    (src / prep.VAL_TAR).unlink()


def _no_devkit(src):
    make_official(src)
    (src / prep.DEVKIT_TGZ).unlink()


def _no_kaggle_val(src):
    make_kaggle(src)
    for f in (src / "ILSVRC/Data/CLS-LOC/val").iterdir():
        f.unlink()
    (src / "ILSVRC/Data/CLS-LOC/val").rmdir()


def _ilsvrc_folder(src):
    """SRC one level too deep: the Kaggle copy's ILSVRC/ folder instead of the folder holding it."""
    make_kaggle(src.parent / "kaggle")
    (src.parent / "kaggle" / "ILSVRC").rename(src)


@pytest.mark.parametrize("make,dst,message", [
    (lambda src: src.mkdir(), "imagenet", "holds neither the official ImageNet files"),
    (lambda src: None, "imagenet", "is not a folder (pass the folder holding ILSVRC2012_img_train.tar"),
    (_no_val_tar, "imagenet", "ILSVRC2012_img_val.tar is missing (the official layout needs the val images"),
    (_no_devkit, "imagenet", "ILSVRC2012_devkit_t12.tar.gz is missing (the official layout's val labels"),
    (_no_kaggle_val, "imagenet", "ILSVRC/Data/CLS-LOC/val is missing (the Kaggle layout holds the val images"),
    (_no_label, "imagenet", "1 val image(s) have no label, e.g. ILSVRC2012_val_00000006.JPEG"),
    (_unknown_class, "imagenet", "the val labels name 1 class(es) with no train folder, e.g. n09999999 (for "
                                 "ILSVRC2012_val_00000006.JPEG)"),
    (make_kaggle, "a_file/imagenet", "is not writable (Not a directory) (choose a folder you can write to)"),
    (_ilsvrc_folder, "imagenet", "is the Kaggle copy's ILSVRC/ folder (pass its parent"),
    (lambda src: [(src / d).mkdir(parents=True) for d in ("train", "val")], "imagenet",
     "already holds train/ and val/ (if they hold class folders, train on it as it is: --data-dir"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, dst, message):
    (tmp_path / "a_file").write_text("not a folder")
    make(tmp_path / "src")
    code, out, err = run(capsys, tmp_path / "src", tmp_path / dst)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_without_scipy_the_devkit_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed: its import fails
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    code, out, err = run(capsys, make_official(tmp_path / "src"), tmp_path / "imagenet")
    assert code == 2
    assert err == ("error: reading the devkit's meta.mat needs scipy (pip install scipy), or use the Kaggle "
                   "layout's LOC_val_solution.csv\n")


def test_the_script_runs_on_its_own_and_its_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prepare_imagenet.py", str(tmp_path / "nothing"), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "prepare_imagenet.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"{tmp_path / 'nothing'} is not a folder" in err


# --------------------------------------------------------------------------- the result trains; data.py's command line
def test_the_result_is_a_data_dir(tmp_path, capsys, monkeypatch):
    src, dst = make_kaggle(tmp_path / "kaggle"), tmp_path / "imagenet"
    monkeypatch.setattr(sys, "argv", ["data.py", "--prepare-imagenet", str(src), "--root", str(dst)])
    runpy.run_path(str(REPO / "data.py"), run_name="__main__")
    assert "train with --data-dir" in capsys.readouterr().out
    args = cli_args(data_dir=str(dst), batch_size=2)
    assert data.resolve_data(args) == ("imagefolder", dst)
    ds = data.open_data(args, cpu_ctx(), replicas=1)
    assert (ds.info.num_classes, ds.info.train_size, ds.info.val_size) == (3, 12, 6)
    for path, label in ds.val_set.samples:  # each val image's label is the one the labels file gave it
        assert ds.val_set.classes[label] == VAL_LABELS[int(Path(path).stem[-8:]) - 1]
    image, label = ds.train_set[0]  # and it decodes
    assert image.shape == (3, 224, 224)


def test_data_py_root_writes_a_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["data.py", "--root", str(tmp_path / "mydata")])
    runpy.run_path(str(REPO / "data.py"), run_name="__main__")
    assert f"--data-dir {tmp_path / 'mydata'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "mydata").iterdir()) == ["train", "val"]
    args = cli_args(data_dir=str(tmp_path / "mydata"), batch_size=2)
    ds = data.open_data(args, cpu_ctx(), replicas=1)
    assert ds.info.num_classes == len(data.CLASSES)
    assert ds.info.train_size == len(data.CLASSES) * data.TRAIN_PER_CLASS
    first = next((tmp_path / "mydata" / "val").rglob("*.png"))
    mtime = first.stat().st_mtime_ns
    runpy.run_path(str(REPO / "data.py"), run_name="__main__")  # again: already there, not rewritten
    assert first.stat().st_mtime_ns == mtime
    (tmp_path / "other" / "train").mkdir(parents=True)  # a folder holding other data is refused, not mixed into
    monkeypatch.setattr(sys, "argv", ["data.py", "--root", str(tmp_path / "other")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "data.py"), run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'other'} already holds a train/ or val/ that is not the "
                                       "sample dataset (choose an empty or new folder for --root)\n")


def test_data_py_help_is_complete(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["data.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "data.py"), run_name="__main__")
    assert e.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.rstrip().endswith("."), description  # a whole sentence, not the docstring's first line
    for usage in ("python data.py --root DIR", "python data.py --prepare-imagenet SRC --root DST"):
        assert usage in text
