"""analyze_results.py on real results files (tests/fixtures, made by make_fixtures.py): tables equal their
inputs, seeds become one experiment whose spread is the noise floor, the link bound comes from the measured
bytes, every plot is a real image, bad files are skipped and incomplete runs marked."""
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import analyze_results

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEFAULTS = ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json")
SEEDS = ("results_baseline_ddp.json", "results_baseline_ddp_seed1.json", "results_all_reduce.json",
         "results_all_reduce_seed1.json")
GUIDE_PLOTS = ("throughput_comparison.png", "training_time_comparison.png", "loss_curves.png",
               "accuracy_curves.png", "communication_overhead.png", "time_breakdown.png")


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def setup_dir(tmp_path, names=DEFAULTS, extra=None, source=FIXTURES):
    """A results folder with the named fixtures plus `extra` {filename: dict or raw text}."""
    results = tmp_path / "results"
    results.mkdir()
    for name in names:
        shutil.copy(source / name, results / name)
    for name, content in (extra or {}).items():
        (results / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return results


def analyze(tmp_path, results, capsys):
    out = tmp_path / "out"
    rc = analyze_results.main(["--results-dir", str(results), "--out-dir", str(out)])
    captured = capsys.readouterr()
    return rc, out, captured.out, captured.err, (out / "performance_report.txt").read_text() if rc == 0 else ""


def md_tables(out):
    """report_tables.md's tables as {title: {method: {header: cell}}}."""
    tables, title, headers = {}, None, None
    for line in (out / "report_tables.md").read_text().splitlines():
        if line.startswith("### "):
            title, headers = line[4:], None
            tables[title] = {}
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if headers is None:
                headers = cells
            elif set(line) - set("|-"):
                tables[title][cells[0]] = dict(zip(headers, cells))
    return tables


def check_plots(out, extra=()):
    for name in GUIDE_PLOTS + tuple(extra):
        img = matplotlib.image.imread(out / "plots" / name)
        assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 300, name
        assert img.std() > 0.01, f"{name} is blank"


def test_three_methods(tmp_path, capsys):
    rc, out, stdout, stderr, report = analyze(tmp_path, setup_dir(tmp_path), capsys)
    assert rc == 0 and stderr == ""
    tables = md_tables(out)
    perf, comm = tables["Performance comparison"], tables["Communication per training step"]
    labels = ["Baseline DDP [2 proc]", "Manual All-Reduce (overlap) [2 proc]", "Parameter Server (collective) [3 proc]"]
    assert list(perf) == list(comm) == labels
    ddp, ar, ps = (fixture(n) for n in DEFAULTS)
    for label, data in zip(labels, (ddp, ar, ps)):
        s, o = data["summary"], data["comm_overhead"]
        assert perf[label]["Avg throughput (img/s)"] == f"{s['avg_train_throughput']:.1f}"
        assert perf[label]["Avg train time/epoch (s)"] == f"{s['avg_train_time_per_epoch']:.2f}"
        assert perf[label]["Best accuracy (%)"] == f"{s['best_val_accuracy']:.2f}"
        assert comm[label]["Comm overhead (ms/step)"] == f"{1e3 * o['overhead']:.1f}"
        assert comm[label]["Spread min-max (ms)"] == f"{1e3 * o['overhead_min']:.1f} to {1e3 * o['overhead_max']:.1f}"
        assert comm[label]["Share of step (%)"] == f"{100 * o['overhead_share']:.1f}"
        assert comm[label]["Scaling efficiency (%)"] == f"{100 * s['scaling_efficiency']:.1f}"
    assert perf[labels[0]]["Relative speedup"] == "1.00x (baseline)"
    assert perf[labels[1]]["Relative speedup"] == \
        f"{ar['summary']['avg_train_throughput'] / ddp['summary']['avg_train_throughput']:.2f}x"
    # The PS (2 workers + server) is compared with DDP on as many trainers.
    assert perf[labels[2]]["Relative speedup"] == \
        f"{ps['summary']['avg_train_throughput'] / ddp['summary']['avg_train_throughput']:.2f}x (vs DDP on 2)"
    assert perf[labels[2]]["Trainers x batch"] == "2 x 16 (+1 server)"
    assert comm[labels[2]]["Param pull (ms)"] == f"{1e3 * ps['summary']['avg_comm_time_pull']:.1f}"
    assert comm[labels[1]]["All-Reduce wait (ms)"] == f"{1e3 * ar['summary']['avg_comm_time']:.1f}"
    check_plots(out)
    for text in ("Performance comparison", "Communication per training step", "model: resnet18",
                 "dataset: sample", "backend: gloo", "network: loopback / not declared", "torch: 2."):
        assert text in report, text
    assert "Performance comparison" in stdout
    # Computed statements: the PS does DDP-on-2's math and matches it step by step, with no noise floor.
    assert "Parameter Server (collective) [3 proc] vs Baseline DDP [2 proc]" in report
    assert "step by step the losses match for the first 12 of 12 steps (the same math)" in report
    assert "no noise floor" in report and "DIFFER" not in report and "RED FLAG" not in report
    assert f"communication overhead {1e3 * ddp['comm_overhead']['overhead']:.1f} ms per step" in report


def test_seeds_are_one_experiment_judged_against_their_spread(tmp_path, capsys):
    rc, out, _, _, report = analyze(tmp_path, setup_dir(tmp_path, SEEDS), capsys)
    assert rc == 0
    perf = md_tables(out)["Performance comparison"]
    assert list(perf) == ["Baseline DDP (2 seeds)", "Manual All-Reduce (overlap) (2 seeds)"]
    thr = [fixture(n)["summary"]["avg_train_throughput"] for n in SEEDS[:2]]
    assert perf["Baseline DDP (2 seeds)"]["Avg throughput (img/s)"] == \
        f"{statistics.mean(thr):.1f} ± {statistics.stdev(thr):.1f}"
    assert perf["Baseline DDP (2 seeds)"]["Seeds"] == "0, 1"
    # The same math: the difference between the methods is within the seed-to-seed spread.
    line = next(x for x in report.splitlines() if x.startswith("- Loss curves: Manual All-Reduce"))
    assert "within the seed-to-seed spread" in line and "they agree" in line, line


def test_a_manual_all_reduce_beyond_the_noise_floor_is_a_red_flag(tmp_path, capsys):
    extra = {}
    for name in SEEDS[2:]:
        wrong = fixture(name)
        for e in wrong["epochs"]:
            e["all_losses"] = [2 * x for x in e["all_losses"]]
        extra[name] = wrong
    rc, _, _, _, report = analyze(tmp_path, setup_dir(tmp_path, SEEDS[:2], extra), capsys)
    assert rc == 0
    assert "RED FLAG" in report and "the seed-to-seed spread" in report


def test_variants_are_identified_by_content(tmp_path, capsys):
    ring = fixture("results_all_reduce_ring.json")  # named anything: kind and sync say what it is
    rc, out, _, _, report = analyze(tmp_path, setup_dir(tmp_path, DEFAULTS + ("results_ps_p2p.json",),
                                                        {"results_mystery.json": ring}), capsys)
    assert rc == 0
    perf = md_tables(out)["Performance comparison"]
    assert list(perf) == [f"{m} [{n} proc]" for m, n in (
        ("Baseline DDP", 2), ("Manual All-Reduce (overlap)", 2), ("Manual All-Reduce (ring)", 2),
        ("Parameter Server (collective)", 3), ("Parameter Server (p2p)", 3))]
    assert perf["Manual All-Reduce (ring) [2 proc]"]["Avg throughput (img/s)"] == \
        f"{ring['summary']['avg_train_throughput']:.1f}"
    p2p, coll = fixture("results_ps_p2p.json"), fixture("results_ps.json")
    ratio = coll["comm_overhead"]["overhead"] / p2p["comm_overhead"]["overhead"]
    assert f"collective communication overhead is {ratio:.2f}x the guide's per-tensor p2p" in report
    assert "a star: every step the server sends" in report  # p2p's sentence, not the collective's


def test_the_link_bound_comes_from_the_measured_bytes(tmp_path, capsys):
    names = ("results_baseline_ddp.json", "results_all_reduce_bucketed.json", "results_ps_p2p.json")
    rc, out, _, _, report = analyze(tmp_path, setup_dir(tmp_path, names, source=FIXTURES / "cluster"), capsys)
    assert rc == 0
    link = md_tables(out)["Communication against the link"]
    for name, kind in zip(names, ("baseline_ddp", "all_reduce", "ps")):
        data = json.loads((FIXTURES / "cluster" / name).read_text())
        sent = statistics.mean(e["link"]["sent_bytes_per_step"] for e in data["epochs"])
        received = statistics.mean(e["link"]["received_bytes_per_step"] for e in data["epochs"])
        # An all-reduce sends and receives at once; a PS pulls, then pushes.
        seconds = (sent + received if kind == "ps" else max(sent, received)) * 8 / data["network"]["link_rate_bits"]
        label = next(k for k in link if k.startswith({"baseline_ddp": "Baseline", "all_reduce": "Manual",
                                                      "ps": "Parameter"}[kind]))
        assert link[label]["Busiest link sent / received per step (MB)"] == f"{sent / 1e6:.1f} / {received / 1e6:.1f}"
        assert link[label]["Time at link rate (ms)"] == f"{1e3 * seconds:.1f}"
        assert link[label]["Comm overhead / link time"] == f"{data['comm_overhead']['overhead'] / seconds:.2f}x"
    assert "star: 2 nodes, each on its own 100mbit link" in report and "star: 3 nodes" in report
    assert "Link bound, Parameter Server (p2p) [3 proc]" in report and "pull, then push" in report
    assert "measured on the 100mbit links: the busiest node link sent" in report
    check_plots(out)


def test_compression_is_weighed_against_its_plain_variant(tmp_path, capsys):
    names = ("results_baseline_ddp.json", "results_baseline_ddp_fp16.json", "results_all_reduce.json",
             "results_all_reduce_fp16.json")
    rc, out, _, _, report = analyze(tmp_path, setup_dir(tmp_path, names), capsys)
    assert rc == 0
    trade = md_tables(out)["Speed and accuracy"]
    fp16 = fixture("results_all_reduce_fp16.json")
    assert trade["Manual All-Reduce (overlap, fp16)"]["Bytes on the wire per step (MB)"] == \
        f"{fp16['wire_bytes_per_step'] / 1e6:.1f}"
    assert fp16["wire_bytes_per_step"] * 2 == fixture("results_all_reduce.json")["wire_bytes_per_step"]
    for label in ("Baseline DDP (fp16) against Baseline DDP", "Manual All-Reduce (overlap, fp16) against Manual "
                  "All-Reduce (overlap)"):
        line = next(x for x in report.splitlines() if x.startswith(f"- {label}:"))
        assert "on this link it" in line and "final val accuracy" in line, line
    check_plots(out, ["speed_vs_accuracy.png"])


def test_bucket_sizes_and_world_sizes_give_their_plots(tmp_path, capsys):
    extra = {}
    for mb, factor in ((1.0, 0.8), (100.0, 1.1)):
        for name in ("results_baseline_ddp.json", "results_all_reduce.json"):
            data = fixture(name)
            data["bucket_mb"] = mb
            data["summary"]["avg_train_throughput"] *= factor
            extra[name.replace(".json", f"_bucket{mb:g}.json")] = data
    big = fixture("results_baseline_ddp.json")
    big.update(world_size=4, trainers=4)
    big["summary"]["avg_train_throughput"] *= 1.8
    extra["results_baseline_ddp_np4.json"] = big
    rc, out, _, _, report = analyze(tmp_path, setup_dir(tmp_path, DEFAULTS, extra), capsys)
    assert rc == 0
    perf = md_tables(out)["Performance comparison"]
    assert "Baseline DDP (1 MiB buckets) [2 proc]" in perf and "Manual All-Reduce (overlap, 100 MiB buckets) [2 proc]" in perf
    assert perf["Baseline DDP [4 proc]"]["Relative speedup"] == "1.00x (baseline)"
    assert "Scaling Baseline DDP (none): " in report and "(90% of linear in trainers)" in report
    check_plots(out, ["bucket_size.png", "scaling.png"])


def test_malformed_and_partial_files_are_named_and_skipped(tmp_path, capsys):
    text = (FIXTURES / "results_ps.json").read_text()
    bad_epoch = fixture("results_all_reduce_ring.json")
    del bad_epoch["epochs"][1]["train_throughput"]
    extra = {"results_ps.json": text[: len(text) // 2], "results_empty.json": "", "results_list.json": "[1, 2]",
             "results_all_reduce.json": {**fixture("results_all_reduce.json"), "epochs": [], "status": "incomplete"},
             "results_all_reduce_ring.json": bad_epoch, "results_alien.json": {"kind": "horovod"}}
    rc, out, _, stderr, report = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",), extra), capsys)
    assert rc == 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 6, lines
    for name, why in (("results_ps.json", "not valid JSON"), ("results_empty.json", "not valid JSON"),
                      ("results_list.json", "not a JSON object"), ("results_all_reduce.json", "no finished epoch"),
                      ("results_all_reduce_ring.json", "epoch 2 lacks valid train_throughput"),
                      ("results_alien.json", "unknown method kind 'horovod'")):
        assert any(line.startswith(f"skipped {name}: ") and why in line for line in lines), (name, lines)
    assert list(md_tables(out)["Performance comparison"]) == ["Baseline DDP"]
    assert "Skipped files: " in report
    check_plots(out)


def test_incomplete_run_is_marked_everywhere(tmp_path, capsys):
    partial = fixture("results_all_reduce.json")
    partial.update(status="incomplete", epochs=partial["epochs"][:1], summary={})
    rc, out, stdout, _, report = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",),
                                                             {"results_all_reduce.json": partial}), capsys)
    assert rc == 0
    perf = md_tables(out)["Performance comparison"]
    label = "Manual All-Reduce (overlap) (incomplete)"
    assert label in perf and label in stdout
    assert perf[label]["Avg throughput (img/s)"] == f"{partial['epochs'][0]['train_throughput']:.1f}"
    assert "results_all_reduce.json has status 'incomplete' with 1 epoch(s) recorded" in report
    assert "Throughput at 2 processes" not in report  # an incomplete run is not ranked
    check_plots(out)


def test_two_files_of_the_same_seed_are_told_apart_by_name(tmp_path, capsys):
    again = fixture("results_ps.json")
    again["summary"]["avg_train_throughput"] = 99.0
    rc, out, _, _, _ = analyze(tmp_path, setup_dir(tmp_path, extra={"results_ps_again.json": again}), capsys)
    assert rc == 0
    perf = md_tables(out)["Performance comparison"]
    assert perf["Parameter Server (collective) [3 proc] <results_ps_again.json>"]["Avg throughput (img/s)"] == "99.0"
    assert "Parameter Server (collective) [3 proc] <results_ps.json>" in perf


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


GUIDE_FIELDS = {  # the guide's example files: top level, per epoch, summary
    "baseline_ddp": (["method", "world_size", "batch_size", "start_time", "end_time", "epochs", "summary", "all_losses"],
                     ["epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
                      "val_loss", "val_accuracy"], ["avg_train_throughput", "avg_train_time_per_epoch",
                                                   "best_val_accuracy"]),
    "all_reduce": (["method", "world_size", "batch_size", "epochs", "summary"],
                   ["epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
                    "avg_comm_time", "all_losses"], ["avg_train_throughput", "avg_train_time_per_epoch",
                                                     "final_train_accuracy"]),
    "ps": (["method", "world_size", "num_workers", "batch_size", "epochs", "summary", "all_losses"],
           ["epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
            "avg_comm_time_pull", "avg_comm_time_push", "val_loss", "val_accuracy"],
           ["avg_train_throughput", "avg_train_time_per_epoch", "avg_comm_time_pull", "avg_comm_time_push",
            "best_val_accuracy"])}


@pytest.mark.parametrize("name", DEFAULTS)
def test_fixtures_are_real_runs_with_every_guide_field(name):
    data = fixture(name)
    top, epoch, summary = GUIDE_FIELDS[data["kind"]]
    assert set(top) <= set(data) and set(summary) <= set(data["summary"])
    assert all(set(epoch) <= set(e) for e in data["epochs"])
    assert data["status"] == "complete" and data["comm_overhead"]["pairs"] == 2
