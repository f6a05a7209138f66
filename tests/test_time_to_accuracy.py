"""The analysis' time to a target accuracy (analysis/time_to_target.py) on hand-made results files: copies of the
real fixtures whose epochs' train_time and val_accuracy are set by hand, so that every time, step count, target,
verdict, table cell and plotted number can be worked out from the numbers here. The first answer is which method
reached the target first and by how much, judged against the seeds' spread; a run that never reached it is named;
runs whose accuracy means nothing (modeled compute) or is not recorded (the guide's all-reduce file) are left out."""
import copy
import math

import pytest

import analysis
from analysis import runs
from analysis import time_to_target as ttt
from test_analyze import GUIDE, Text, analyze, check_plots, first_page, fixture, setup_dir

# (fixture, per-epoch train_time, per-epoch val_accuracy): 3 epochs each, 6 steps an epoch as in the fixtures.
PLAN = {
    "results_baseline_ddp.json": ([10, 10, 10], [50, 65.5, 72]),
    "results_baseline_ddp_seed1.json": ([11, 11, 11], [55, 66, 71]),
    "results_all_reduce.json": ([5, 5, 5], [50, 66, 73]),
    "results_all_reduce_seed1.json": ([5.5, 5.5, 5.5], [52, 67, 74]),
    "results_ps.json": ([8, 8, 8], [30, 45, 60]),  # never reaches 65
}
TARGET = 65.0  # DDP was run with --target-accuracy 65 (its record); the others' files are older (no record)


def hand(name, times, accs, target=None):
    data = fixture(name)
    first = data["epochs"][0]
    data["epochs"] = [{**copy.deepcopy(first), "epoch": i + 1, "train_time": t, "val_accuracy": a}
                      for i, (t, a) in enumerate(zip(times, accs))]
    data["summary"].update(best_val_accuracy=max(accs), final_val_accuracy=accs[-1])
    if target is not None:
        reached = next(i for i, a in enumerate(accs) if a >= target)
        data["time_to_target"] = {"target": target, "reached": True, "epoch": reached + 1, "steps": 6 * (reached + 1),
                                  "seconds": float(sum(times[:reached + 1])), "val_accuracy": accs[reached],
                                  "stopped": False}
    else:
        data.pop("time_to_target", None)
    return data


def folder(tmp_path, plan=PLAN, extra=None):
    files = {n: hand(n, t, a, TARGET if "baseline" in n else None) for n, (t, a) in plan.items()}
    return setup_dir(tmp_path, (), {**files, **(extra or {})})


def test_the_time_to_target_is_what_the_numbers_say(tmp_path):
    xs, _ = runs.load_folder(folder(tmp_path))
    ddp, ar, ps = xs
    # The given target first, then the highest all reached (the PS's best, 60) and the round values below it.
    assert ttt.choose_targets(xs) == [65.0, 60.0, 50.0, 40.0]
    assert ttt.run_reach(ddp.runs[0], 65.0) == {"epoch": 2, "steps": 12, "seconds": 20.0, "val_accuracy": 65.5,
                                                 "source": "record"}
    assert ttt.run_reach(ar.runs[1], 65.0) == {"epoch": 2, "steps": 12, "seconds": 11.0, "val_accuracy": 67.0,
                                                "source": "epochs"}
    d, a, p = (ttt.reach(x, 65.0) for x in xs)
    assert d.seconds.values == (20.0, 22.0) and a.seconds.values == (10.0, 11.0) and p.seconds is None
    assert p.missed == ["results_ps.json"] and d.steps.values == (12.0, 12.0)
    assert ttt.reach(ddp, 50.0).seconds.values == (10.0, 11.0)  # epoch 1 of both seeds
    assert ttt.reach(ps, 60.0).seconds.values == (24.0,)
    # DDP 21 ± 1.41 s, the all-reduce 10.5 ± 0.71 s: 10.5 s apart, twice their combined spread 3.16 s.
    v = ttt.compare_reach(d, a)
    assert v.diff == 10.5 and v.noise == pytest.approx(2 * math.hypot(math.sqrt(2), math.sqrt(0.5))) and v.beyond
    said = analysis.answer.sentences(xs)["Time to accuracy"]
    assert said[0].startswith("Time to 65% val accuracy, the runs' --target-accuracy (training seconds, validation "
                              "excluded")
    assert said[1] == "The all-reduce 10.50 ± 0.71 s (epoch 2), DDP 21.00 ± 1.41 s (epoch 2)."
    assert said[2] == "The all-reduce reached 65% first."
    assert said[3] == "DDP took 10.50 s more (2.00x): beyond the seed spread, ±3.16 s."
    assert "The PS never reached it." in said
    table = Text(folder(tmp_path / "again")).tables["Time to accuracy"]
    assert table["Baseline DDP [2 proc] (2 seeds)"]["Time to 65% (s)"] == "21.00 ± 1.41"
    assert table["Parameter Server (collective) [3 proc]"]["Time to 65% (s)"] == "never (best 60.0%)"
    assert table["Parameter Server (collective) [3 proc]"]["Time to 60% (s)"] == "24.00"
    assert table["Manual All-Reduce (overlap) [2 proc] (2 seeds)"]["Steps to 65%"] == "12"


def test_the_verdict_uses_the_seeds_spread(tmp_path):
    """The same means (DDP 21 s, the all-reduce 10.5 s), DDP's seeds 20 s apart instead of 2: within the spread."""
    plan = {**PLAN, "results_baseline_ddp.json": ([5, 6, 10], [50, 65.5, 72]),
            "results_baseline_ddp_seed1.json": ([15, 16, 11], [55, 66, 71])}
    xs, _ = runs.load_folder(folder(tmp_path, plan))
    d, a = ttt.reach(xs[0], 65.0), ttt.reach(xs[1], 65.0)
    assert (d.seconds.mean, a.seconds.mean) == (21.0, 10.5)
    v = ttt.compare_reach(d, a)
    assert v.noise == pytest.approx(2 * math.hypot(math.sqrt(200), math.sqrt(0.5))) and v.within
    said = analysis.answer.sentences(xs)["Time to accuracy"]
    assert "DDP took 10.50 s more (2.00x): within the seed spread, ±28.32 s, no measurable lead." in said
    # One seed each: no verdict, and what to run for one.
    one = {n: v for n, v in PLAN.items() if "seed1" not in n}
    said = " ".join(analysis.answer.sentences(runs.load_folder(folder(tmp_path / "one", one))[0])["Time to accuracy"])
    assert "DDP took 10.00 s more (2.00x), not judged (one seed, no noise measure)" in said
    assert 'run several seeds: bash run_all.sh --seeds "0 1 2"' in said


def test_modeled_runs_and_files_without_validation_are_left_out_and_named(tmp_path):
    modeled = hand("results_all_reduce_fp16.json", [1, 1, 1], [90, 95, 99])
    modeled["compute_model"] = {"kind": "flops", "label": "modeled compute: flops at 20 TFLOP/s", "spec": "flops:20"}
    r = analyze(tmp_path, folder(tmp_path, extra={"results_all_reduce_fp16.json": modeled}))
    assert r.rc == 0
    cells = r.tables["Time to accuracy"]
    label = next(k for k in cells if "modeled compute" in k)
    assert cells[label]["Time to 65% (s)"] == "n/a (modeled compute)"
    assert ttt.choose_targets(r.analysis.experiments)[1] == 60.0  # its 99% is not "reached by all"
    page = first_page(r.raw)
    assert page.index("\nTime to accuracy. ") < page.index("\nThroughput. ")  # the first answer
    drawn = r.plots
    assert drawn["time_to_accuracy.png"]["target"] == 65.0
    assert drawn["time_to_accuracy.png"]["bars"] == {
        "Baseline DDP [2 proc] (2 seeds)": 21.0, "Manual All-Reduce (overlap) [2 proc] (2 seeds)": 10.5,
        label: None, "Parameter Server (collective) [3 proc]": None}
    curves = drawn["accuracy_vs_time.png"]["curves"]
    assert curves["Baseline DDP [2 proc] (2 seeds)"] == [(10.5, 52.5), (21.0, 65.75), (31.5, 71.5)]
    assert label not in curves and label in drawn["accuracy_vs_time.png"]["note"]
    assert drawn["loss_vs_time.png"]["curves"]["Parameter Server (collective) [3 proc]"]["end"] == pytest.approx(
        24.0, rel=0.1)  # its last smoothed step, near the end of epoch 3
    check_plots(r.out, ("accuracy_vs_time.png", "loss_vs_time.png", "time_to_accuracy.png"))
    # The guide's own files: the all-reduce records no validation accuracy, and says so; steps are unknown.
    guide, _ = runs.load_folder(GUIDE)
    said = " ".join(analysis.answer.sentences(guide)["Time to accuracy"])
    assert "Not measured for the all-reduce: its file records no validation accuracy per epoch." in said
    assert "DDP 896.50 s (epoch 3)" in said  # 300.5 + 298.1 + 297.9 s to its 9.87%, above the PS's best 9.45%
    assert ttt.reach(guide[0], 9.45).steps is None


def test_the_details_rank_every_compared_run_at_each_target(tmp_path):
    r = Text(folder(tmp_path))
    line = r.line("Time to 65%:")
    assert line == ("- Time to 65%: Manual All-Reduce (overlap) [2 proc] (2 seeds) first, 10.50 ± 0.71 s; then "
                    "Baseline DDP [2 proc] (2 seeds) 21.00 ± 1.41 s (2.00x; beyond the seed spread, ±3.16 s); never "
                    "reached by Parameter Server (collective) [3 proc].")
    assert r.line("Time to 60%:").endswith("Parameter Server (collective) [3 proc] 24.00 s (2.29x; one seed: not "
                                           "judged).")
