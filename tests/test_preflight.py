"""preflight.py (bash run_all.sh --check): a good setup passes with a line per check, each failure is named on a
FAIL line with its fix and exits 1, warnings do not fail, and run_all.sh --check runs nothing."""
import os
import subprocess

import pytest
import torch
from torchvision import models

import preflight
from dist_helpers import REPO, make_image_folder

TOPICS = ("packages", "gpus", "arguments", "data", "weights", "disk", "rendezvous")


@pytest.fixture(autouse=True)
def single_machine(monkeypatch, tmp_path):
    """No rendezvous variables from the environment the tests run in; the working folder holds no ./train."""
    for name in preflight.RENDEZVOUS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def check(*argv):
    lines = []
    code = preflight.main(list(map(str, argv)), out=lines.append)
    return code, lines


def by_topic(lines):
    """{topic: (status, text)} from the check lines, and the summing-up line."""
    checks = {}
    for line in lines[:-1]:
        status, rest = line[:6].strip(), line[6:]
        topic, text = rest.split(": ", 1)
        assert status in ("ok", "warn", "FAIL") and topic not in checks, line
        checks[topic] = (status, text)
    return checks, lines[-1]


def test_a_good_setup_passes_on_the_sample_dataset(tmp_path):
    weights = tmp_path / "r18.pth"
    torch.save(models.resnet18().state_dict(), weights)
    code, lines = check("--nproc", "2", "--", "--backend", "gloo", "--arch", "resnet18", "--weights", weights)
    checks, summary = by_topic(lines)
    assert code == 0, lines
    assert tuple(checks) == TOPICS and not any(status == "FAIL" for status, _ in checks.values())
    assert checks["data"][1].startswith("the built-in sample dataset (10 classes, 96 train / 24 val images each)")
    assert checks["gpus"][1].startswith("0 GPU(s) found: gloo on CPU (--backend gloo), 2 process(es)")
    assert checks["weights"] == ("ok", f"{weights} ({weights.stat().st_size / 1e6:.0f} MB, loads into resnet18)")
    assert checks["rendezvous"][1].startswith("one machine")
    assert summary.startswith("preflight: nothing would fail (")


def test_warnings_do_not_fail(tmp_path):
    """resnet50 without its weights file trains from random init; little free disk space is a warning."""
    code, lines = check("--min-free-gb", "1e9", "--", "--backend", "gloo")
    checks, summary = by_topic(lines)
    assert code == 0, lines
    assert checks["weights"][0] == "warn"
    assert "random init (the guide starts from ImageNet weights" in checks["weights"][1]
    assert checks["disk"][0] == "warn" and "under 1e+09 GiB" in checks["disk"][1]
    assert checks["gpus"][0] == "warn" and "the guide expects 4 GPUs" in checks["gpus"][1]
    assert "warning(s): read the warn lines" in summary


def _no_val(root):
    make_image_folder(root, classes=2, train_per_class=2, val_per_class=1)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()


def _classes_differ(root):
    make_image_folder(root, classes=3, train_per_class=2, val_per_class=1)
    (root / "val" / "class2").rename(root / "val" / "class7")


def _nested_and_stray(root):
    """ImageFolder finds images in a class's subfolders; files that are not images it skips (a warning)."""
    make_image_folder(root, classes=2, train_per_class=2, val_per_class=1)
    (root / "train" / "class0" / "more").mkdir()
    (root / "train" / "class0" / "0.png").rename(root / "train" / "class0" / "more" / "0.png")
    (root / "train" / "class1" / "notes.txt").write_text("not an image")


def _empty_class(root):
    make_image_folder(root, classes=2, train_per_class=2, val_per_class=1)
    (root / "train" / "class9").mkdir()
    (root / "val" / "class9").mkdir()


@pytest.mark.parametrize("make,argv,topic,text", [
    (_no_val, ["--data-dir", "{root}"], "data", "--data-dir {root}: {root}/val is missing (the ImageFolder layout is"),
    (_classes_differ, ["--data-dir", "{root}"], "data",
     "--data-dir {root}: train and val classes differ (1 only in train, e.g. ['class2']; 1 only in val, "
     "e.g. ['class7'])"),
    (_empty_class, ["--data-dir", "{root}"], "data", "1 empty class folder(s) in {root}/train, e.g. class9"),
    (None, ["--data-dir", "{root}"], "data", "--data-dir {root} does not exist (pass the folder that holds train/"),
    (None, ["--batch-size", "500"], "data", "; batch size 500 is larger than the 480 training images each of 2"),
    (None, ["--backend", "nccl"], "gpus", "0 GPU(s) found, but --backend nccl needs one GPU for each process, and 2 "
                                          "would run on this machine (use --backend gloo)"),
    (None, ["--weights", "{root}.pth"], "weights", "--weights {root}.pth does not exist (pass the path to "
                                                   "resnet50-0676ba61.pth)"),
    (lambda root: root.with_suffix(".pth").write_bytes(b"not a state dict"), ["--weights", "{root}.pth"], "weights",
     "{root}.pth is not a resnet50 state dict"),
    (None, ["--sync", "ring"], "arguments",
     "baseline_multi_card.py and ps_train.py: unrecognized arguments: --sync ring"),
])
def test_each_failure_is_named_and_exits_non_zero(tmp_path, make, argv, topic, text):
    root = tmp_path / "data"
    if make:
        make(root)
    code, lines = check("--nproc", "2", "--", *[a.format(root=root) for a in argv])
    checks, summary = by_topic(lines)
    assert code == 1
    assert [t for t, (status, _) in checks.items() if status == "FAIL"] == [topic], lines
    assert text.format(root=root) in checks[topic][1]
    assert summary.startswith(f"preflight: 1 problem(s) would make the run fail ({topic}): fix the FAIL lines")


def test_data_counted_as_imagefolder_finds_it(tmp_path):
    root = tmp_path / "data"
    _nested_and_stray(root)
    code, lines = check("--nproc", "2", "--", "--data-dir", root, "--batch-size", "2")
    status, text = by_topic(lines)[0]["data"]
    assert code == 0 and status == "warn"
    assert text == (f"--data-dir {root}: 2 classes (the same in train and val), 4 train / 2 val images; 1 file(s) are "
                    f"not images in class folders and are skipped, e.g. {root}/train/class1/notes.txt (remove them if "
                    "they should not be there)")


def test_rendezvous_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    checks, _ = by_topic(check("--", "--backend", "gloo")[1])
    assert checks["rendezvous"] == ("ok", "MASTER_ADDR=127.0.0.1, MASTER_PORT=29511 (the rendezvous host resolves)")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "2")
    monkeypatch.setenv("MASTER_PORT", "99999")
    code, lines = check("--", "--backend", "gloo")
    status, text = by_topic(lines)[0]["rendezvous"]
    assert code == 1 and status == "FAIL"
    assert "NODE_RANK=2 is not one of the nodes 0..1; port '99999' of 127.0.0.1:99999 is not a port number" in text
    # run_all.sh runs torchrun --standalone: the variables are not used, which is worth a warning, not a failure
    code, lines = check("--from-run-all", "--", "--backend", "gloo")
    assert code == 0 and by_topic(lines)[0]["rendezvous"][0] == "warn"


def test_the_emulated_cluster_needs_ip_and_tc(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without iproute2
    code, lines = check("--cluster", "2x1", "--", "--backend", "gloo")
    status, text = by_topic(lines)[0]["rendezvous"]
    assert code == 1 and status == "FAIL"
    assert text.startswith("emulated cluster: 2 node(s) x 1 process(es) on 1gbit links")
    assert "'ip' not found; 'tc' not found" in text and "(install iproute2, which provides ip and tc" in text


def test_run_all_check_runs_the_checks_with_its_settings_and_nothing_else(tmp_path):
    make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    (tmp_path / "results_stale.json").write_text("{}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "BACKEND": "nccl", "DATA_DIR": str(tmp_path / "data"),
           "BATCH_SIZE": "2", "EXTRA_ARGS": "--arch resnet18"}
    for name in preflight.RENDEZVOUS_ENV:
        env.pop(name, None)
    proc = subprocess.run(["bash", str(REPO / "run_all.sh"), "--check"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("run_all.sh: 2 processes (nccl;")  # what it would run, then the checks
    checks, summary = by_topic(lines[2:])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert tuple(checks) == TOPICS
    assert checks["gpus"] == ("FAIL", "0 GPU(s) found, but BACKEND=nccl needs one GPU for each process, and 2 would "
                                      "run on this machine (use BACKEND=gloo)")
    assert checks["data"] == ("ok", f"DATA_DIR {tmp_path / 'data'}: 2 classes (the same in train and val), 8 train / "
                                    "4 val images")
    assert checks["arguments"][1] == "the three scripts accept: --backend nccl --batch-size 2 --data-dir " \
                                     f"{tmp_path / 'data'} --arch resnet18"
    assert summary.startswith("preflight: 1 problem(s) would make the run fail (gpus)")
    assert (tmp_path / "results_stale.json").exists() and not (tmp_path / "plots").exists()  # nothing ran
