"""run_all.sh end to end on the sample dataset with small settings, its failure path, and its plan."""
import json
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image

REPO = Path(__file__).resolve().parent.parent
SMALL = {"NPROC": "2", "EPOCHS": "1", "BATCH_SIZE": "8", "WORKERS": "0",
         "EXTRA_ARGS": "--arch resnet18 --image-size 16 --max-steps 2 --timeout 2"}


def run_all(cwd, *args, timeout=300, **env):
    return subprocess.run(["bash", str(REPO / "run_all.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_end_to_end_small(tmp_path):
    (tmp_path / "results_stale.json").write_text("{ left over from an older run")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.png").write_text("stale")
    proc = run_all(tmp_path, **SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "results_stale.json").exists() and not (tmp_path / "plots" / "old.png").exists()
    kinds = {}
    for name in ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data["status"] == "complete" and data["world_size"] == 2 and data["batch_size"] == 8
        assert data["arch"] == "resnet18" and data["dataset"]["name"] == "sample" and data["backend"] == "gloo"
        assert len(data["epochs"]) == 1 and data["epochs"][0]["steps"] == 2
        kinds[data["kind"]] = data
    assert set(kinds) == {"baseline_ddp", "all_reduce", "ps"}
    assert kinds["all_reduce"]["sync"] == "overlap" and kinds["ps"]["comm"] == "collective"
    for name in ("throughput_comparison", "training_time_comparison", "loss_curves", "accuracy_curves",
                 "communication_overhead", "time_breakdown"):
        assert matplotlib.image.imread(tmp_path / "plots" / f"{name}.png").ndim == 3
    report = (tmp_path / "performance_report.txt").read_text()
    assert "Performance comparison" in report and "Communication per training step" in report
    # The terminal table shows the throughput each JSON recorded.
    for label, data in (("Baseline DDP", kinds["baseline_ddp"]), ("Parameter Server (collective)", kinds["ps"])):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(label + "  "))
        assert f"{data['summary']['avg_train_throughput']:.1f}" in row.split()
    assert re.search(r"=== all done in \d+s; files:", proc.stdout)
    assert "performance_report.txt" in proc.stdout.split("files:")[-1]


def test_failed_experiment_stops_with_clear_message(tmp_path):
    proc = run_all(tmp_path, **{**SMALL, "DATA_DIR": str(tmp_path / "no_such_dataset")})
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr  # the training script's own one-line error
    assert "run_all.sh: error: experiment 1/3 (Baseline DDP, np=2) failed with exit code" in proc.stderr
    assert "=== [2/3]" not in proc.stdout and "=== analysis" not in proc.stdout
    assert not (tmp_path / "performance_report.txt").exists()


def test_plan_with_variants_and_sweep(tmp_path):
    (tmp_path / "results_keep.json").write_text("{}")
    proc = run_all(tmp_path, "--variants", "--sweep", "1 2 4", DRY_RUN="1", NPROC="2",
                   EXTRA_ARGS="--arch resnet18 --max-steps 2", RESULTS_DIR="out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results_keep.json").exists()  # a dry run deletes nothing
    commands = [line.strip() for line in proc.stdout.splitlines() if "torch.distributed.run" in line]
    outputs = [c.rsplit("--output ", 1)[1] for c in commands]
    assert outputs == ["out/" + n for n in (
        "results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json",
        "results_all_reduce_per_param.json", "results_all_reduce_bucketed.json", "results_all_reduce_ring.json",
        "results_ps_p2p.json", "results_ps_overlap.json",
        "results_baseline_ddp_np1.json", "results_all_reduce_np1.json",  # no PS at one process
        "results_baseline_ddp_np4.json", "results_all_reduce_np4.json", "results_ps_np4.json")]
    assert all("--standalone" in c and "--backend gloo --arch resnet18 --max-steps 2" in c for c in commands)
    assert "--nproc_per_node=4" in commands[-1] and "--nproc_per_node=1" in commands[-5]
    assert "all_reduce_train.py --backend gloo --arch resnet18 --max-steps 2 --sync ring" in commands[5]
    assert "ps_train.py --backend gloo --arch resnet18 --max-steps 2 --comm p2p" in commands[6]
    assert "skipping the parameter server at np=1" in proc.stdout


def test_bad_options_are_one_line_errors(tmp_path):
    for args, env in ((["--bogus"], {}), (["--sweep"], {}), ([], {"NPROC": "two"})):
        proc = run_all(tmp_path, *args, DRY_RUN="1", **env)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("run_all.sh: error: ")
