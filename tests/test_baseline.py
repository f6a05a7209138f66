"""baseline_multi_card.py end to end (torchrun, gloo), and one clear line for each user mistake."""
import json
import math

import pytest
import torch

from dist_helpers import FAST_ARGS, make_image_folder, run_python, run_script

GUIDE_TOP = ["method", "world_size", "batch_size", "start_time", "end_time", "epochs", "summary", "all_losses"]
GUIDE_EPOCH = ["epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
               "val_loss", "val_accuracy"]
GUIDE_SUMMARY = ["avg_train_throughput", "avg_train_time_per_epoch", "best_val_accuracy"]


def test_ddp_on_the_sample_dataset_with_resnet50(tmp_path):
    """The guide's command with no data argument: the sample dataset, the real ResNet50, every guide field."""
    out = tmp_path / "results_baseline_ddp.json"
    proc = run_script("baseline_multi_card.py", "--epochs", "2", "--max-steps", "2", "--calib-steps", "1",
                      "--workers", "0", "--output", out, nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample dataset" in proc.stdout and "epoch 2: train loss" in proc.stdout
    data = json.loads(out.read_text())
    assert all(k in data for k in GUIDE_TOP)
    assert all(k in e for e in data["epochs"] for k in GUIDE_EPOCH)
    assert all(k in data["summary"] for k in GUIDE_SUMMARY)
    assert data["method"] == "Baseline DDP (PyTorch)" and data["world_size"] == 2 and data["batch_size"] == 64
    assert data["status"] == "complete" and data["arch"] == "resnet50" and data["dataset"]["name"] == "sample"
    assert data["dataset"]["num_classes"] == 10 and data["image_size"] == 32
    assert [e["epoch"] for e in data["epochs"]] == [1, 2]
    for e in data["epochs"]:
        assert e["images_trained"] == 2 * 2 * 64  # 2 steps x 2 processes x 64: images really trained on
        assert 0 <= e["train_accuracy"] <= 100 and 0 <= e["val_accuracy"] <= 100
        assert math.isfinite(e["train_loss"]) and math.isfinite(e["val_loss"])
        assert e["train_throughput"] > 0 and 0 < e["avg_batch_time"] < e["train_time"]
        assert len(e["all_losses"]) == 2
    assert len(data["all_losses"]) == 4 and data["all_losses"][0] == pytest.approx(math.log(10), rel=0.3)
    cal = data["comm_calibration"]
    assert cal["fwd_bwd_with_sync"] > 0 and cal["fwd_bwd_compute_only"] > 0 and cal["exposed_comm_time"] >= 0
    assert data["summary"]["avg_comm_time"] == cal["exposed_comm_time"]
    assert data["summary"]["best_val_accuracy"] == max(e["val_accuracy"] for e in data["epochs"])


def test_ddp_trains_on_a_given_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imagenet", classes=3, train_per_class=8, val_per_class=3)
    out = tmp_path / "r.json"
    proc = run_script("baseline_multi_card.py", *FAST_ARGS, "--data-dir", root, "--output", out,
                      "--calib-steps", "0", nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dataset"]["name"] == "imagefolder" and data["dataset"]["root"] == str(root.resolve())
    assert data["dataset"]["train_size"] == 24 and data["dataset"]["num_classes"] == 3
    assert data["epochs"][0]["steps"] == 3  # 24 images / 2 processes / batch 4


def _one_error_line(proc):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def _mistake(tmp_path, *args):
    return run_python("baseline_multi_card.py", *FAST_ARGS, "--output", tmp_path / "r.json", *args,
                      cwd=tmp_path, timeout=120)


def test_missing_data_dir(tmp_path):
    line = _one_error_line(_mistake(tmp_path, "--data-dir", tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in line and "does not exist" in line
    assert not (tmp_path / "r.json").exists()  # never a silent fallback to the sample dataset


def test_missing_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "d")
    import shutil
    shutil.rmtree(root / "val")
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root))
    assert str(root / "val") in line


def test_empty_class_folder(tmp_path):
    root = make_image_folder(tmp_path / "d")
    (root / "train" / "empty_class").mkdir()
    (root / "val" / "empty_class").mkdir()
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root))
    assert "empty_class" in line


@pytest.mark.parametrize("workers,damage", [("0", "garbage"), ("1", "garbage"), ("0", "truncated")])
def test_corrupted_image(tmp_path, workers, damage):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2)
    for image in (root / "train" / "class0").iterdir():
        image.write_bytes(b"this is not a png" if damage == "garbage" else image.read_bytes()[:60])
    proc = _mistake(tmp_path, "--data-dir", root, "--workers", workers, "--calib-steps", "0")
    line = _one_error_line(proc)
    assert "cannot read image" in line and "class0" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_nccl_without_gpus(tmp_path):
    line = _one_error_line(_mistake(tmp_path, "--backend", "nccl"))
    assert "GPU" in line and "--backend gloo" in line


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--epochs", "0"), ("--batch-size", "-3"),
                                        ("--epochs", "two")])
def test_non_positive_settings(tmp_path, flag, value):
    line = _one_error_line(_mistake(tmp_path, flag, value))
    assert flag in line


def test_wrong_data_dir_under_torchrun_is_reported_once(tmp_path):
    proc = run_script("baseline_multi_card.py", *FAST_ARGS, "--data-dir", tmp_path / "nowhere", nproc=2,
                      cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "nowhere" in ours[0]


def test_non_image_files_are_skipped_with_a_warning(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2)
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    proc = _mistake(tmp_path, "--data-dir", root, "--calib-steps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipped 1 file(s)" in proc.stdout and "notes.txt" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["dataset"]["train_size"] == 8


def test_class_folders_differ_between_train_and_val(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2)
    (root / "val" / "class1").rename(root / "val" / "other")
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root))
    assert "class folders differ" in line and "class1" in line and "other" in line


def test_empty_val(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2)
    import shutil
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root))
    assert str(root / "val") in line


def test_batch_larger_than_a_shard(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=1)
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root, "--batch-size", "9"))
    assert "--batch-size 9 is larger than the 8 training images" in line


@pytest.mark.parametrize("where", ["missing", "unwritable"])
def test_output_that_cannot_be_written(tmp_path, where):
    target = tmp_path / "no" / "r.json" if where == "missing" else "/proc/r.json"  # root can't write /proc
    proc = run_python("baseline_multi_card.py", *FAST_ARGS, "--output", target, cwd=tmp_path, timeout=120)
    line = _one_error_line(proc)
    assert str(target.parent if where == "missing" else "/proc") in line


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    line = _one_error_line(_mistake(tmp_path, "--weights", tmp_path / "w.pth"))
    assert "is not a resnet18 state dict" in line


def test_nan_loss_stops_and_keeps_valid_results(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=40, val_per_class=2)
    line = _one_error_line(_mistake(tmp_path, "--data-dir", root, "--lr", "1e6", "--calib-steps", "0",
                                    "--epochs", "3"))
    assert "loss became nan" in line or "loss became inf" in line
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "incomplete"
