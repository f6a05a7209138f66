"""analyze_results.py on fixture JSONs: tables equal the inputs, every plot is a real image, bad files skipped."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import analyze_results

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEFAULTS = ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json")
VARIANTS = ("results_all_reduce_ring.json", "results_ps_p2p.json")
GUIDE_PLOTS = ("throughput_comparison.png", "training_time_comparison.png", "loss_curves.png",
               "accuracy_curves.png", "communication_overhead.png", "time_breakdown.png")


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def setup_dir(tmp_path, names=DEFAULTS, extra=None):
    """A results folder with the named fixtures plus `extra` {filename: dict or raw text}."""
    results = tmp_path / "results"
    results.mkdir()
    for name in names:
        shutil.copy(FIXTURES / name, results / name)
    for name, content in (extra or {}).items():
        (results / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return results


def analyze(tmp_path, results, capsys):
    out = tmp_path / "out"
    rc = analyze_results.main(["--results-dir", str(results), "--out-dir", str(out)])
    captured = capsys.readouterr()
    return rc, out, captured.out, captured.err


def md_tables(out):
    """report_tables.md's two tables as lists of {header: cell}."""
    tables, current, headers = [], None, None
    for line in (out / "report_tables.md").read_text().splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if current is None:
            current, headers = [], cells
            tables.append(current)
        elif set(line) - set("|-"):
            current.append(dict(zip(headers, cells)))
    assert len(tables) == 2, tables
    return {row["Method"]: row for row in tables[0]}, {row["Method"]: row for row in tables[1]}


def check_plots(out, scaling=False):
    names = GUIDE_PLOTS + (("scaling.png",) if scaling else ())
    for name in names:
        img = matplotlib.image.imread(out / "plots" / name)
        assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 300, name
        assert img.std() > 0.01, f"{name} is blank"
    assert (out / "plots" / "scaling.png").exists() == scaling


def check_row(perf, comm, label, data, ddp):
    s = data["summary"]
    assert perf[label]["Avg throughput (img/s)"] == f"{s['avg_train_throughput']:.1f}"
    assert perf[label]["Avg train time/epoch (s)"] == f"{s['avg_train_time_per_epoch']:.2f}"
    assert perf[label]["Best accuracy (%)"] == f"{s['best_val_accuracy']:.2f}"
    speedup = s["avg_train_throughput"] / ddp["summary"]["avg_train_throughput"]
    expected = "1.00x (baseline)" if data["kind"] == "baseline_ddp" else f"{speedup:.2f}x"
    assert perf[label]["Relative speedup"] == expected
    step = s["avg_batch_time"]
    if data["kind"] == "ps":
        pull, push = 1e3 * s["avg_comm_time_pull"], 1e3 * s["avg_comm_time_push"]
        assert comm[label]["Param pull (ms)"] == f"{pull:.2f}"
        assert comm[label]["Grad push (ms)"] == f"{push:.2f}"
        assert comm[label]["Total comm (ms)"] == f"{pull:.2f} + {push:.2f} = {pull + push:.2f}"
        assert comm[label]["All-Reduce (ms)"] == "-"
        assert comm[label]["Share of step (%)"] == f"{100 * (pull + push) / 1e3 / step:.1f}"
        assert perf[label]["Trainers x batch"] == f"{data['num_workers']} x {data['batch_size']} (+1 server)"
    else:
        exposed = data["comm_calibration"]["exposed_comm_time"] if data["kind"] == "baseline_ddp" \
            else s["avg_comm_time"]
        assert comm[label]["All-Reduce (ms)"] == f"{1e3 * exposed:.2f}"
        assert comm[label]["Total comm (ms)"].startswith(f"{1e3 * exposed:.2f}")
        assert comm[label]["Param pull (ms)"] == comm[label]["Grad push (ms)"] == "-"
        assert comm[label]["Share of step (%)"] == f"{100 * exposed / step:.1f}"


def test_all_three_methods(tmp_path, capsys):
    rc, out, stdout, stderr = analyze(tmp_path, setup_dir(tmp_path), capsys)
    assert rc == 0 and stderr == ""
    perf, comm = md_tables(out)
    labels = ["Baseline DDP", "Manual All-Reduce (overlap)", "Parameter Server (collective)"]
    assert list(perf) == list(comm) == labels
    ddp = fixture("results_baseline_ddp.json")
    for label, name in zip(labels, DEFAULTS):
        check_row(perf, comm, label, fixture(name), ddp)
    assert "(exposed, measured)" in comm["Baseline DDP"]["Total comm (ms)"]
    check_plots(out)
    report = (out / "performance_report.txt").read_text()
    for text in ("Performance comparison", "Communication per training step", "Avg throughput (img/s)",
                 "Param pull (ms)", "Speedup relative to Baseline DDP", "dataset: sample (960 train / 240 val",
                 "model: resnet18", "backend: gloo", "world size (processes): 2", "torch: 2."):
        assert text in report, text
    assert "Performance comparison" in stdout and "Communication per training step" in stdout
    # The analysis is computed: fastest method and ratio, comm shares, loss agreement, PS bottleneck.
    thr = {n: fixture(n)["summary"]["avg_train_throughput"] for n in DEFAULTS}
    ratio = thr["results_baseline_ddp.json"] / thr["results_ps.json"]
    assert f"Baseline DDP is fastest at {thr['results_baseline_ddp.json']:.1f} img/s" in report
    assert f"{ratio:.2f}x Parameter Server (collective)" in report
    assert "Manual All-Reduce (overlap) vs Baseline DDP" in report and "match step by step" in report
    assert "PS bottleneck" in report and "pull 34.0 ms + push 29.0 ms" in report
    assert "global batch is num_workers x batch" in report


def test_variants_are_extra_rows_identified_by_content(tmp_path, capsys):
    # A file's name says nothing: the ring run is recognised from its "kind" and "sync".
    ring = fixture("results_all_reduce_ring.json")
    results = setup_dir(tmp_path, DEFAULTS + ("results_ps_p2p.json",), {"results_mystery.json": ring})
    rc, out, _, _ = analyze(tmp_path, results, capsys)
    assert rc == 0
    perf, comm = md_tables(out)
    assert list(perf) == ["Baseline DDP", "Manual All-Reduce (overlap)", "Manual All-Reduce (ring)",
                          "Parameter Server (collective)", "Parameter Server (p2p)"]
    ddp = fixture("results_baseline_ddp.json")
    check_row(perf, comm, "Manual All-Reduce (ring)", ring, ddp)
    check_row(perf, comm, "Parameter Server (p2p)", fixture("results_ps_p2p.json"), ddp)
    assert "collective communication is 0.72x the guide's per-parameter p2p" in \
        (out / "performance_report.txt").read_text()
    check_plots(out)


@pytest.mark.parametrize("names", [("results_baseline_ddp.json", "results_ps.json"),
                                   ("results_all_reduce.json", "results_ps.json")])
def test_only_two_methods(tmp_path, capsys, names):
    rc, out, _, stderr = analyze(tmp_path, setup_dir(tmp_path, names), capsys)
    assert rc == 0 and stderr == ""
    perf, comm = md_tables(out)
    assert len(perf) == len(comm) == 2
    if "results_baseline_ddp.json" in names:
        check_row(perf, comm, "Parameter Server (collective)", fixture("results_ps.json"),
                  fixture("results_baseline_ddp.json"))
    else:
        assert {row["Relative speedup"] for row in perf.values()} == {"n/a (no DDP run)"}
        assert perf["Manual All-Reduce (overlap)"]["Avg throughput (img/s)"] == \
            f"{fixture('results_all_reduce.json')['summary']['avg_train_throughput']:.1f}"
    check_plots(out)
    assert "Communication per training step" in (out / "performance_report.txt").read_text()


def test_malformed_and_partial_files_are_named_and_skipped(tmp_path, capsys):
    text = (FIXTURES / "results_ps.json").read_text()
    no_epochs = {**fixture("results_all_reduce.json"), "epochs": [], "status": "incomplete"}
    bad_epoch = fixture("results_all_reduce_ring.json")
    del bad_epoch["epochs"][1]["train_throughput"]
    extra = {"results_ps.json": text[: len(text) // 2], "results_empty.json": "",
             "results_list.json": "[1, 2]", "results_all_reduce.json": no_epochs,
             "results_all_reduce_ring.json": bad_epoch}
    rc, out, _, stderr = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",), extra), capsys)
    assert rc == 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 5, lines
    for name, why in (("results_ps.json", "not valid JSON"), ("results_empty.json", "not valid JSON"),
                      ("results_list.json", "not a JSON object"), ("results_all_reduce.json", "no finished epoch"),
                      ("results_all_reduce_ring.json", "epoch 2 lacks valid train_throughput")):
        assert any(line.startswith(f"skipped {name}: ") and why in line for line in lines), (name, lines)
    perf, _ = md_tables(out)
    assert list(perf) == ["Baseline DDP"]
    assert "Skipped files: " in (out / "performance_report.txt").read_text()
    check_plots(out)


def test_incomplete_run_is_marked_everywhere(tmp_path, capsys):
    partial = fixture("results_all_reduce.json")
    partial["status"] = "incomplete"
    partial["epochs"] = partial["epochs"][:1]
    partial["summary"] = {}  # numbers then come from the finished epoch itself
    rc, out, stdout, _ = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json", "results_ps.json"),
                                                     {"results_all_reduce.json": partial}), capsys)
    assert rc == 0
    perf, comm = md_tables(out)
    label = "Manual All-Reduce (overlap) (incomplete)"
    assert label in perf and label in comm and "Manual All-Reduce (overlap)" not in perf
    epoch = partial["epochs"][0]
    assert perf[label]["Avg throughput (img/s)"] == f"{epoch['train_throughput']:.1f}"
    assert perf[label]["Best accuracy (%)"] == f"{epoch['val_accuracy']:.2f}"
    assert comm[label]["All-Reduce (ms)"] == f"{1e3 * epoch['avg_comm_time']:.2f}"
    assert label in stdout
    report = (out / "performance_report.txt").read_text()
    assert f"{label}: status 'incomplete' with 1 epoch(s) recorded" in report
    assert "Throughput at 2 processes: Baseline DDP is fastest" in report  # the incomplete run is not ranked
    check_plots(out)


def test_world_size_sweep_gives_scaling_plot(tmp_path, capsys):
    extra = {}
    for name, factor in (("results_baseline_ddp.json", 1.8), ("results_ps.json", 2.5)):
        data = fixture(name)
        data["world_size"] = 4
        data["num_workers"] = 3 if data["kind"] == "ps" else None
        data = {k: v for k, v in data.items() if v is not None}
        data["summary"]["avg_train_throughput"] *= factor
        extra[name.replace(".json", "_np4.json")] = data
    rc, out, _, _ = analyze(tmp_path, setup_dir(tmp_path, extra=extra), capsys)
    assert rc == 0
    perf, _ = md_tables(out)
    assert perf["Baseline DDP [4 proc]"]["Relative speedup"] == "1.00x (baseline)"
    ps4 = extra["results_ps_np4.json"]["summary"]["avg_train_throughput"]
    ddp4 = extra["results_baseline_ddp_np4.json"]["summary"]["avg_train_throughput"]
    assert perf["Parameter Server (collective) [4 proc]"]["Relative speedup"] == f"{ps4 / ddp4:.2f}x"
    assert perf["Parameter Server (collective) [4 proc]"]["Trainers x batch"] == "3 x 16 (+1 server)"
    check_plots(out, scaling=True)
    report = (out / "performance_report.txt").read_text()
    assert "Scaling Baseline DDP: " in report and "(90% of linear)" in report  # 1.8x for 2x the processes
    assert "world size (processes): " in report and "Baseline DDP [4 proc]: 4" in report


def test_diverging_loss_curve_is_reported(tmp_path, capsys):
    wrong = fixture("results_all_reduce.json")
    for e in wrong["epochs"]:
        e["all_losses"] = [x * 1.5 for x in e["all_losses"]]
        e["train_loss"] *= 1.5
    rc, out, _, _ = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",),
                                                 {"results_all_reduce.json": wrong}), capsys)
    assert rc == 0
    report = (out / "performance_report.txt").read_text()
    assert "per-epoch train loss differs by at most 50.00%" in report and "DIFFER" in report


def test_no_results_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results_broken.json").write_text("{")
    for folder in (empty, tmp_path / "missing"):
        proc = subprocess.run([sys.executable, str(REPO / "analyze_results.py"), "--results-dir", str(folder),
                               "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "plots").exists()


def test_two_files_of_the_same_run_are_told_apart_by_name(tmp_path, capsys):
    again = fixture("results_ps.json")
    again["summary"]["avg_train_throughput"] = 99.0
    rc, out, _, _ = analyze(tmp_path, setup_dir(tmp_path, extra={"results_ps_again.json": again}), capsys)
    assert rc == 0
    perf, _ = md_tables(out)
    assert perf["Parameter Server (collective) <results_ps.json>"]["Avg throughput (img/s)"] == \
        f"{fixture('results_ps.json')['summary']['avg_train_throughput']:.1f}"
    assert perf["Parameter Server (collective) <results_ps_again.json>"]["Avg throughput (img/s)"] == "99.0"


def test_ps_is_compared_with_the_ddp_of_as_many_trainers(tmp_path, capsys):
    # A PS with 2 workers does the math of DDP on 2 processes (same shards, same global batch).
    ddp = fixture("results_baseline_ddp.json")
    twin = fixture("results_ps.json")
    twin.update(world_size=3, num_workers=2, epochs=ddp["epochs"], all_losses=ddp["all_losses"])
    rc, out, _, _ = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",),
                                                {"results_ps.json": twin}), capsys)
    assert rc == 0
    report = (out / "performance_report.txt").read_text()
    assert "Parameter Server (collective) [3 proc] vs Baseline DDP [2 proc]: per-epoch train loss differs by " \
           "at most 0.00%" in report and "match step by step" in report
