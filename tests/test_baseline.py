"""baseline_multi_card.py end to end (torchrun, gloo), and one clear line for each user mistake."""
import json
import math
import shutil

import pytest
import torch

from dist_helpers import FAST_ARGS, make_image_folder, one_error_line, run_forked, run_script, two_at_a_time

GUIDE_TOP = ["method", "world_size", "batch_size", "start_time", "end_time", "epochs", "summary", "all_losses"]
GUIDE_EPOCH = ["epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
               "val_loss", "val_accuracy"]
GUIDE_SUMMARY = ["avg_train_throughput", "avg_train_time_per_epoch", "best_val_accuracy"]


def test_ddp_on_the_sample_dataset_with_resnet50(tmp_path):
    """The guide's command with no data argument: the sample dataset, the real ResNet50, every guide field."""
    out = tmp_path / "results_baseline_ddp.json"
    proc = run_forked("baseline_multi_card.py", "--epochs", "2", "--max-steps", "2", "--overhead-pairs", "1",
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
    assert data["trainers"] == 2 and data["steps_per_epoch"] == 2 and data["comm_hook"] == "none"
    assert data["dataset"]["dropped_last_image"] is False  # 480 images a process: 7 x 64 + 32
    assert data["gradient_bytes"] == data["wire_bytes_per_step"] > 9e7  # ResNet50: 23.5M float32 gradients
    # The communication yardstick, end to end: one pair of DDP steps against the bare module's, before epoch 1.
    overhead = data["comm_overhead"]
    assert overhead["pairs"] == 1 and overhead["run_length"] == 1 and "definition" in overhead
    assert overhead["step_time"] > 0 and overhead["local_step_time"] > 0
    assert overhead["overhead_min"] <= overhead["overhead"] <= overhead["overhead_max"]
    assert overhead["overhead_share"] == pytest.approx(overhead["overhead"] / overhead["step_time"])
    assert "blocking_overhead" not in overhead  # DDP has one way to synchronize
    assert "communication overhead:" in proc.stdout
    for e in data["epochs"]:
        assert e["scaling_efficiency"] == pytest.approx(e["train_throughput"] / (2 * 64 / overhead["local_step_time"]))
        # compute ends with this rank's last gradient; sync is backward's wait for DDP's all-reduce after it
        assert set(e["phase_times"]) == {"data", "compute", "sync", "update"} and e["lrs"] == [0.01] * 2
        assert e["rank_compute"]["ranks"] == [0, 1] and len(e["rank_compute"]["compute"]) == 2
        assert e["rank_compute"]["median"] == pytest.approx(e["phase_times"]["compute"])  # mean of 2 = median
        assert set(e["ddp_logging"]) >= {"avg_backward_comm_time", "avg_backward_compute_comm_overlap_time"}
        timed = e["steps"] - e["warmup_steps"]  # a spread needs two timed steps; fewer record null
        assert e["step_time_stdev"] >= 0 if timed > 1 else e["step_time_stdev"] is None
    assert data["summary"]["scaling_efficiency"] == pytest.approx(
        sum(e["scaling_efficiency"] for e in data["epochs"]) / 2)
    assert data["summary"]["best_val_accuracy"] == max(e["val_accuracy"] for e in data["epochs"])


def test_ddp_trains_on_a_given_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imagenet", classes=3, train_per_class=8, val_per_class=3)
    out = tmp_path / "r.json"
    proc = run_forked("baseline_multi_card.py", *FAST_ARGS, "--data-dir", root, "--output", out, nproc=2,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dataset"]["name"] == "imagefolder" and data["dataset"]["root"] == str(root.resolve())
    assert data["dataset"]["train_size"] == 24 and data["dataset"]["num_classes"] == 3
    assert data["epochs"][0]["steps"] == 3  # 24 images / 2 processes / batch 4


# --------------------------------------------------------------------------- one clear line per user mistake
# Each mistake is its own single-process run (`python baseline_multi_card.py`, in its own folder). They are
# independent, and each uses one core, so the `mistakes` fixture runs them all, two at a time, and each test
# checks its own run.
def _no_setup(folder):
    return []


def _data_dir(**kw):
    def setup(folder):
        return ["--data-dir", make_image_folder(folder / "d", **kw)]
    return setup


def _without_val(folder):
    root = make_image_folder(folder / "d")
    shutil.rmtree(root / "val")
    return ["--data-dir", root]


def _empty_class(folder):
    root = make_image_folder(folder / "d")
    (root / "train" / "empty_class").mkdir()
    (root / "val" / "empty_class").mkdir()
    return ["--data-dir", root]


def _corrupted(workers, damage):
    def setup(folder):
        root = make_image_folder(folder / "d", classes=2, train_per_class=4, val_per_class=2)
        for image in (root / "train" / "class0").iterdir():
            image.write_bytes(b"this is not a png" if damage == "garbage" else image.read_bytes()[:60])
        return ["--data-dir", root, "--workers", workers]
    return setup


def _with_notes(folder):
    root = make_image_folder(folder / "d", classes=2, train_per_class=4, val_per_class=2)
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    return ["--data-dir", root]


def _classes_differ(folder):
    root = make_image_folder(folder / "d", classes=2)
    (root / "val" / "class1").rename(root / "val" / "other")
    return ["--data-dir", root]


def _empty_val(folder):
    root = make_image_folder(folder / "d", classes=2)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    return ["--data-dir", root]


def _bad_weights(folder):
    (folder / "w.pth").write_bytes(b"not a checkpoint")
    return ["--weights", folder / "w.pth"]


CORRUPTED = [("0", "garbage"), ("1", "garbage"), ("0", "truncated")]
NON_POSITIVE = [("--batch-size", "0"), ("--epochs", "0"), ("--batch-size", "-3"), ("--epochs", "two")]
MISTAKES = {
    "missing_data_dir": lambda folder: ["--data-dir", folder / "nowhere"],
    "missing_val": _without_val,
    "empty_class": _empty_class,
    **{f"corrupted-{w}-{d}": _corrupted(w, d) for w, d in CORRUPTED},
    "nccl": lambda folder: ["--backend", "nccl"],
    **{f"setting{flag}={value}": lambda folder, f=flag, v=value: [f, v] for flag, value in NON_POSITIVE},
    "non_image_files": _with_notes,
    "classes_differ": _classes_differ,
    "empty_val": _empty_val,
    "batch_larger_than_shard": lambda folder: [*_data_dir(classes=2, train_per_class=4, val_per_class=1)(folder),
                                               "--batch-size", "9"],
    "output_missing": lambda folder: ["--output", folder / "no" / "r.json"],
    "output_unwritable": lambda folder: ["--output", "/proc/r.json"],  # even root cannot write /proc
    "bad_weights": _bad_weights,
    "nan_loss": lambda folder: [*_data_dir(classes=2, train_per_class=40, val_per_class=2)(folder), "--lr", "1e6",
                                "--epochs", "3"],
}


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """{name: (folder, CompletedProcess)} for every run in MISTAKES."""
    def run(name):
        folder = tmp_path_factory.mktemp(name.replace("=", "_"))
        args = MISTAKES[name](folder)
        return folder, run_forked("baseline_multi_card.py", *FAST_ARGS, "--output", folder / "r.json", *args,
                                  cwd=folder, timeout=300)
    return {name: outcome() for name, outcome in two_at_a_time(run, MISTAKES).items()}


def test_missing_data_dir(mistakes):
    folder, proc = mistakes["missing_data_dir"]
    line = one_error_line(proc)
    assert str(folder / "nowhere") in line and "does not exist" in line
    assert not (folder / "r.json").exists()  # never a silent fallback to the sample dataset


def test_missing_val_folder(mistakes):
    folder, proc = mistakes["missing_val"]
    assert str(folder / "d" / "val") in one_error_line(proc)


def test_empty_class_folder(mistakes):
    assert "empty_class" in one_error_line(mistakes["empty_class"][1])


@pytest.mark.parametrize("workers,damage", CORRUPTED)
def test_corrupted_image(mistakes, workers, damage):
    line = one_error_line(mistakes[f"corrupted-{workers}-{damage}"][1])
    assert "cannot read image" in line and "class0" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPUs")
def test_nccl_without_gpus(mistakes):
    line = one_error_line(mistakes["nccl"][1])
    assert "GPU" in line and "--backend auto or gloo" in line and "runs on the CPU" in line


@pytest.mark.parametrize("flag,value", NON_POSITIVE)
def test_non_positive_settings(mistakes, flag, value):
    line = one_error_line(mistakes[f"setting{flag}={value}"][1])
    assert flag in line


def test_wrong_data_dir_under_torchrun_is_reported_once(tmp_path):
    proc = run_script("baseline_multi_card.py", *FAST_ARGS, "--data-dir", tmp_path / "nowhere", nproc=2,
                      cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "nowhere" in ours[0]


def test_non_image_files_are_skipped_with_a_warning(mistakes):
    folder, proc = mistakes["non_image_files"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipped 1 file(s)" in proc.stdout and "notes.txt" in proc.stdout
    assert json.loads((folder / "r.json").read_text())["dataset"]["train_size"] == 8


def test_class_folders_differ_between_train_and_val(mistakes):
    line = one_error_line(mistakes["classes_differ"][1])
    assert "class folders differ" in line and "class1" in line and "other" in line


def test_empty_val(mistakes):
    folder, proc = mistakes["empty_val"]
    assert str(folder / "d" / "val") in one_error_line(proc)


def test_batch_larger_than_a_shard(mistakes):
    line = one_error_line(mistakes["batch_larger_than_shard"][1])
    assert "--batch-size 9 is larger than the 8 training images" in line


@pytest.mark.parametrize("where", ["missing", "unwritable"])
def test_output_that_cannot_be_written(mistakes, where):
    folder, proc = mistakes[f"output_{where}"]
    line = one_error_line(proc)
    assert str(folder / "no" if where == "missing" else "/proc") in line


def test_weights_file_that_is_not_a_state_dict(mistakes):
    assert "is not a resnet18 state dict" in one_error_line(mistakes["bad_weights"][1])


def test_nan_loss_stops_and_keeps_valid_results(mistakes):
    folder, proc = mistakes["nan_loss"]
    line = one_error_line(proc)
    assert "loss became nan" in line or "loss became inf" in line
    assert json.loads((folder / "r.json").read_text())["status"] == "incomplete"


# --------------------------------------------------------------------------- communication hooks
def test_one_bucket_at_a_time_starts_a_bucket_only_after_the_previous_one_finished():
    """Under gloo PowerSGD's hook is wrapped so that bucket 2's exchange cannot start (and so issue its
    collectives) before bucket 1's has completed: every rank then issues the collectives in the same order."""
    import threading
    import time
    import baseline_multi_card as ddp_script
    started, futures = [], [torch.futures.Future(), torch.futures.Future()]

    def hook(state, bucket):
        started.append(bucket)
        return futures[bucket]

    ordered = ddp_script.one_bucket_at_a_time(hook)
    assert ordered(None, 0) is futures[0] and started == [0]
    second = threading.Thread(target=ordered, args=(None, 1))
    second.start()
    time.sleep(0.3)
    assert started == [0]  # bucket 1 waits for bucket 0
    futures[0].set_result(None)
    second.join(timeout=5)
    assert started == [0, 1] and not second.is_alive()



# --------------------------------------------------------------------------- what a new user meets
def test_a_resume_of_another_run_leaves_the_results_as_they_were_and_a_new_run_keeps_the_old_one(tmp_path,
                                                                                                   tiny_data):
    out = tmp_path / "r.json"
    args = [*FAST_ARGS, "--data-dir", tiny_data, "--max-steps", "2", "--output", out]
    first = run_forked("baseline_multi_card.py", *args, "--resume", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "notice: no --weights for --arch resnet18: starting from random init" in first.stdout
    before = out.read_bytes()
    wrong = run_forked("baseline_multi_card.py", *args, "--resume", "--arch", "resnet34", cwd=tmp_path)
    line = one_error_line(wrong, code=2)
    assert "--arch resnet18 there, resnet34 here" in line and "results file was left as it was" in line
    assert out.read_bytes() == before  # not even marked incomplete
    again = run_forked("baseline_multi_card.py", *args, cwd=tmp_path)  # a new run into the same file
    assert again.returncode == 0, again.stderr[-3000:]
    kept, = (tmp_path / "previous").iterdir()
    assert kept.read_bytes() == before and f"moved it to {kept}" in again.stdout
    assert json.loads(out.read_text())["status"] == "complete"


@pytest.mark.parametrize("script,modes", [("all_reduce_train.py", ["one all-reduce per gradient tensor after backward"]),
                                          ("ps_train.py", ["the guide's original: one dist.send"])])
def test_help_shows_the_docstring_and_no_empty_defaults(script, modes):
    out = run_forked(script, "--help").stdout
    assert all(m in out for m in modes) and "torchrun --nproc_per_node=4" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "--checkpoint-every STEPS" in out and "results_<method>[_<variant>].json" in out
