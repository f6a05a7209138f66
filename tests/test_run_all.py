"""run_all.sh end to end on the sample dataset with small settings, its failure path, and its plans."""
import json
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

import all_reduce_train
import baseline_multi_card
import modes
import ps_train
from dist_helpers import one_error_line

REPO = Path(__file__).resolve().parent.parent
SMALL = {"NPROC": "2", "EPOCHS": "1", "BATCH_SIZE": "8", "WORKERS": "0",
         "EXTRA_ARGS": "--image-size 16 --max-steps 2 --timeout 2 --overhead-pairs 1"}


def run_all(cwd, *args, timeout=300, **env):
    return subprocess.run(["bash", str(REPO / "run_all.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def planned(proc):
    return [line.strip() for line in proc.stdout.splitlines() if "torch.distributed.run" in line]


def test_end_to_end_small(tmp_path):
    (tmp_path / "results_stale.json").write_text("{ left over from an older run")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.png").write_text("stale")
    proc = run_all(tmp_path, **SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The earlier run's files are moved aside, not deleted, and the move is said.
    assert not (tmp_path / "results_stale.json").exists() and not (tmp_path / "plots" / "old.png").exists()
    away, = (tmp_path / "previous").iterdir()
    assert (away / "results_stale.json").exists() and (away / "plots" / "old.png").exists()
    assert f"moved the earlier run's 2 file(s) (results, report, plots) to ./previous/{away.name}/" in proc.stdout
    kinds = {}
    for name in ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data["status"] == "complete" and data["world_size"] == 2 and data["batch_size"] == 8
        # The sample dataset's first-run recipe, with the environment's settings on top of it.
        assert data["arch"] == "resnet18" and data["dataset"]["name"] == "sample" and data["backend"] == "gloo"
        # EPOCHS=1 of the recipe's 14: its one-epoch warm-up scaled to 1/14 epoch, so the run is not all warm-up
        assert data["args"]["lr_scheduler"] == "cosine" and data["args"]["lr_warmup_epochs"] == pytest.approx(1 / 14, 1e-2)
        assert len(data["epochs"]) == 1 and data["epochs"][0]["steps"] == 2 and data["comm_overhead"]["pairs"] == 1
        kinds[data["kind"]] = data
    assert set(kinds) == {"baseline_ddp", "all_reduce", "ps"}
    for name in ("throughput_comparison", "training_time_comparison", "loss_curves", "accuracy_curves",
                 "communication_overhead", "time_breakdown"):
        assert matplotlib.image.imread(tmp_path / "plots" / f"{name}.png").ndim == 3
    report = (tmp_path / "performance_report.txt").read_text()
    assert "Performance comparison" in report and "Communication per training step" in report
    # The terminal table shows the throughput each JSON recorded.
    for label, data in (("Baseline DDP", kinds["baseline_ddp"]), ("Parameter Server (collective)", kinds["ps"])):
        table = proc.stdout.split("Performance comparison", 1)[1]
        row = next(line for line in table.splitlines() if line.startswith(label + "  "))
        assert f"{data['summary']['avg_train_throughput']:.1f}" in row.split()
    assert re.search(r"=== all done in \d+s; files:", proc.stdout)
    assert "first-run recipe (EPOCHS=1 of its 14: warm-up scaled to 0.0714 epochs)" in proc.stdout


def test_failed_experiment_stops_with_clear_message(tmp_path):
    proc = run_all(tmp_path, **{**SMALL, "DATA_DIR": str(tmp_path / "no_such_dataset")})
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr  # the training script's own one-line error
    assert "run_all.sh: error: experiment 1/3 (Baseline DDP, np=2) failed with exit code" in proc.stderr
    assert "=== [2/3]" not in proc.stdout and "=== analysis" not in proc.stdout
    assert not (tmp_path / "performance_report.txt").exists()


def test_plan_with_variants_compression_buckets_sweep_and_seeds(tmp_path):
    (tmp_path / "results_keep.json").write_text("{}")
    proc = run_all(tmp_path, "--variants", "--compression", "--bucket-sweep", "5 25", "--sweep", "1 2 4",
                   DRY_RUN="1", NPROC="2", EXTRA_ARGS="--max-steps 2", RESULTS_DIR="out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results_keep.json").exists()  # a dry run deletes nothing
    commands = planned(proc)
    outputs = [c.rsplit("--output ", 1)[1] for c in commands]
    assert outputs == ["out/" + n for n in (
        "results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json",
        "results_all_reduce_bucketed.json", "results_all_reduce_per_param.json", "results_all_reduce_ring.json",
        "results_all_reduce_pipelined.json", "results_all_reduce_hierarchical.json", "results_all_reduce_local.json",
        "results_ps_p2p.json", "results_ps_overlap.json", "results_ps_pipelined.json", "results_ps_sharded.json",
        "results_baseline_ddp_fp16.json", "results_baseline_ddp_bf16.json", "results_baseline_ddp_powersgd.json",
        "results_all_reduce_fp16.json", "results_all_reduce_bf16.json",
        "results_baseline_ddp_bucket5.json", "results_all_reduce_bucket5.json",  # 25 MiB is the main runs'
        "results_baseline_ddp_np1.json", "results_all_reduce_np1.json",  # no PS at one process
        "results_baseline_ddp_np4.json", "results_all_reduce_np4.json", "results_ps_np4.json")]
    assert all("--standalone" in c and "--max-steps 2" in c for c in commands)
    assert "--nproc_per_node=4" in commands[-1] and "--nproc_per_node=1" in commands[-5]
    assert commands[5].endswith("--sync ring --output out/results_all_reduce_ring.json")
    assert commands[8].endswith("--sync local --output out/results_all_reduce_local.json")
    assert commands[12].endswith("--servers all --output out/results_ps_sharded.json")
    assert "--comm-hook powersgd --powersgd-warmup 10" in commands[15]
    assert "--bucket-mb 5" in commands[18] and "--compress bf16" in commands[17]
    assert "skipping the parameter server at np=1" in proc.stdout
    seeds = planned(run_all(tmp_path, "--seeds", "0 3", DRY_RUN="1", NPROC="2"))
    assert [c.rsplit("--output ", 1)[1] for c in seeds] == [
        f"./results_{m}_seed{s}.json" for s in (0, 3) for m in ("baseline_ddp", "all_reduce", "ps")]
    assert all(c.split(" --output")[0].endswith(f"--seed {s}") for c, s in zip(seeds, (0, 0, 0, 3, 3, 3)))


def test_the_sample_recipe_applies_only_to_the_sample_dataset(tmp_path):
    sample = planned(run_all(tmp_path, DRY_RUN="1", NPROC="2"))
    assert all("--arch resnet18 --lr 0.1 --lr-warmup-epochs 1 --lr-scheduler cosine" in c and "--epochs 14" in c
               for c in sample)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    imagenet = planned(run_all(tmp_path, DRY_RUN="1", NPROC="2", DATA_DIR=str(tmp_path / "data")))
    assert imagenet and not any("--arch" in c or "--epochs" in c or "--lr" in c for c in imagenet)


def test_the_shell_scripts_plan_every_variant_the_scripts_have():
    """run_all.sh and gpu_smoke.sh read the variant lists from modes.py, which the scripts' parsers use: --variants
    plans every non-default --sync and --comm, --compression every DDP hook."""
    assert baseline_multi_card.parse_args([]).comm_hook == modes.COMM_HOOKS[0]
    assert all_reduce_train.parse_args([]).sync == modes.SYNC_MODES[0]
    assert ps_train.parse_args([]).comm == modes.PS_COMMS[0]
    commands = planned(run_all(REPO, "--variants", "--compression", DRY_RUN="1", NPROC="3"))
    for flag, values in (("--sync", modes.SYNC_MODES), ("--comm", modes.PS_COMMS), ("--comm-hook", modes.COMM_HOOKS)):
        assert [v for v in values[1:] if not any(f"{flag} {v} " in c for c in commands)] == [], flag
    smoke = (REPO / "gpu_smoke.sh").read_text()
    for name in ("SYNC_MODES", "PS_COMMS", "COMM_HOOKS"):
        assert f"modes.py {name})" in smoke, name


def test_the_target_accuracy_goes_to_every_run_with_the_sample_recipes_default(tmp_path):
    """On the sample dataset every run gets SAMPLE_TARGET unless --target-accuracy says another (or none); on a
    dataset of the user's, only the one given."""
    target = modes.sample_recipe()["SAMPLE_TARGET"]
    sample = planned(run_all(tmp_path, DRY_RUN="1", NPROC="2"))
    assert len(sample) == 3 and all(f"--target-accuracy {target} " in c for c in sample)
    given = planned(run_all(tmp_path, "--target-accuracy", "55.5", DRY_RUN="1", NPROC="2"))
    assert all("--target-accuracy 55.5 " in c and f"--target-accuracy {target} " not in c for c in given)
    assert not any("--target-accuracy" in c for c in planned(run_all(tmp_path, "--target-accuracy=none",
                                                                     DRY_RUN="1", NPROC="2")))
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    mine = dict(DRY_RUN="1", NPROC="2", DATA_DIR=str(tmp_path / "data"))
    assert not any("--target-accuracy" in c for c in planned(run_all(tmp_path, **mine)))
    assert all("--target-accuracy 76 " in c for c in planned(run_all(tmp_path, "--target-accuracy", "76", **mine)))


@pytest.mark.parametrize("args,env", [(["--bogus"], {}), (["--sweep"], {}), ([], {"NPROC": "two"}),
                                      (["--seeds", "a"], {}), (["--bucket-sweep", "0"], {}),
                                      (["--target-accuracy", "101"], {}), (["--target-accuracy"], {})])
def test_bad_options_are_one_line_errors(tmp_path, args, env):
    one_error_line(run_all(tmp_path, *args, DRY_RUN="1", **env), prefix="run_all.sh: error: ", code=2)
