"""The analysis (analyze_results.py and the analysis/ package) on real results files (tests/fixtures, made by
make_fixtures.py) and on files in the guide's own shape (tests/fixtures/guide): tables equal their inputs, seeds
become one experiment whose spread is the noise floor, the link bound comes from the measured bytes, every plot is
a real image whose numbers are the tables', the report and the tables tell one story, any JSON file in the folder
is looked at and named when skipped, and incomplete runs are marked. The fields the training side is adding
(rank_compute, ddp_logging, restarts, the hierarchical sync, runs at several node counts) are tested on
tests/fixtures/hand (copies of the real fixtures with those fields added, make_hand.py): each cell, sentence and
plotted number against the file's fields, and a file without them names them as not measured, once."""
import contextlib
import copy
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import analysis
import analyze_results
from analysis import runs

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GUIDE = FIXTURES / "guide"
DEFAULTS = ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json")
SEEDS = ("results_baseline_ddp.json", "results_baseline_ddp_seed1.json", "results_all_reduce.json",
         "results_all_reduce_seed1.json")
GUIDE_PLOTS = ("throughput_comparison.png", "training_time_comparison.png", "loss_curves.png",
               "accuracy_curves.png", "communication_overhead.png", "time_breakdown.png")
NEGATIVE_RATIO = re.compile(r"(?<![\w.])-\d+(\.\d+)?(x|%)")  # "-16.21x", "-6.0%": a ratio across a sign change
PERF, COMM, OWN, LINK = ("Performance comparison", "Communication per training step",
                         "Communication as each script timed it", "Communication against the link")


def unwrap(text):
    """The report's logical lines: a bullet or a context line that the report wrapped at 120 columns continues
    indented two more than its first line, and is joined back to it."""
    out = []
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        first = len(out[-1]) - len(out[-1].lstrip()) if out else 0
        if out and indent == first + 2 and (out[-1].lstrip().startswith("- ") or first == 2):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def fixture(name, source=FIXTURES):
    return json.loads((source / name).read_text())


def setup_dir(tmp_path, names=DEFAULTS, extra=None, source=FIXTURES, folder="results"):
    """A results folder with the named fixtures plus `extra` {filename: dict or raw text}."""
    results = tmp_path / folder
    results.mkdir(parents=True)
    for name in names:
        shutil.copy(source / name, results / name)
    for name, content in (extra or {}).items():
        (results / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return results


class Result:
    """One analysis: its return code, output folder, stdout, stderr, report text and what it drew."""

    def __init__(self, tmp_path, results, via_main=False):
        self.out = tmp_path / "out"
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if via_main:
                self.rc, self.analysis = analyze_results.main(["--results-dir", str(results), "--out-dir",
                                                               str(self.out)]), None
            else:
                self.analysis = analysis.analyze(results, self.out)
                self.rc = 0 if self.analysis else 1
        self.stdout, self.stderr = stdout.getvalue(), stderr.getvalue()
        self.raw = (self.out / "performance_report.txt").read_text() if self.rc == 0 else ""
        self.report = unwrap(self.raw)
        self.tables = md_tables(self.out) if self.rc == 0 else {}
        self.plots = self.analysis.plots if self.analysis else None

    def line(self, start):
        """The report's analysis line that starts with "- <start>"."""
        return next(x for x in self.report.splitlines() if x.startswith(f"- {start}"))


def analyze(tmp_path, results, via_main=False):
    return Result(tmp_path, results, via_main)


class Text:
    """The tables and the report's text of a results folder, without drawing the plots (for tests of prose)."""

    def __init__(self, results):
        self.experiments, skipped = runs.load_folder(results)
        tables = analysis.tables.build_tables(self.experiments)
        self.tables = {t.title: {row[t.columns[0]]: row for row in t.rows} for t in tables}
        self.raw = analysis.report.build_report(self.experiments, skipped, tables, {})
        self.report = unwrap(self.raw)

    line = Result.line


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


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """The three methods' default runs, analysed once through the command's entry point."""
    tmp = tmp_path_factory.mktemp("defaults")
    return analyze(tmp, setup_dir(tmp), via_main=True)


@pytest.fixture(scope="module")
def defaults_drawn(tmp_path_factory):
    """The same runs through analysis.analyze, which hands back what the plots drew."""
    tmp = tmp_path_factory.mktemp("drawn")
    return analyze(tmp, setup_dir(tmp))


# --------------------------------------------------------------------------- the kit's own files
def test_three_methods(defaults):
    r = defaults
    assert r.rc == 0 and r.stderr == ""
    perf, comm, own = r.tables[PERF], r.tables[COMM], r.tables[OWN]
    labels = ["Baseline DDP [2 proc]", "Manual All-Reduce (overlap) [2 proc]", "Parameter Server (collective) [3 proc]"]
    assert list(perf) == list(comm) == list(own) == labels
    ddp, ar, ps = (fixture(n) for n in DEFAULTS)
    for label, data in zip(labels, (ddp, ar, ps)):
        s, o = data["summary"], data["comm_overhead"]
        assert perf[label]["Avg throughput (img/s)"] == f"{s['avg_train_throughput']:.1f}"
        assert perf[label]["Avg train time/epoch (s)"] == f"{s['avg_train_time_per_epoch']:.2f}"
        assert perf[label]["Best accuracy (%)"] == f"{s['best_val_accuracy']:.2f}"
        assert perf[label]["Seeds (n: values)"] == "1: 0"
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
    # Each script's own timers: their own table, never the yardstick's columns.
    assert own[labels[2]]["Param pull (ms)"] == f"{1e3 * ps['summary']['avg_comm_time_pull']:.1f}"
    assert own[labels[1]]["All-Reduce wait (ms)"] == f"{1e3 * ar['summary']['avg_comm_time']:.1f}"
    assert own[labels[0]]["Total comm (ms)"] == "(implicit, inside backward)"
    check_plots(r.out)
    for text in ("Performance comparison", "Communication per training step", "model: resnet18",
                 "dataset: sample", "backend: gloo", "network: loopback / not declared", "torch: 2."):
        assert text in r.report, text
    assert "Performance comparison" in r.stdout
    # Computed statements: the PS does DDP-on-2's math and matches it step by step, with no noise floor; so does
    # the manual all-reduce (a mismatch would fail here).
    for method in ("Parameter Server (collective) [3 proc]", "Manual All-Reduce (overlap) [2 proc]"):
        line = r.line(f"Loss curves: {method} vs Baseline DDP [2 proc]")
        assert "step by step the losses match for the first 12 of 12 steps (the same math)" in line, line
    assert "no noise floor" in r.report and "RED FLAG" not in r.report
    assert f"communication overhead {1e3 * ddp['comm_overhead']['overhead']:.1f} ms per step" in r.report
    # One seed and no step_time_stdev: the ranking says it has no noise measure.
    line = r.line("Throughput at 2 processes")
    assert "Manual All-Reduce (overlap) [2 proc] has the highest" in line and "not judged against noise" in line
    assert "step-time spread" in r.report.split("Not measured by these runs")[1]


def test_report_tables_and_plots_tell_one_story(defaults_drawn):
    """Every figure the tables, the report and the plots all show is the same number with the same verdict."""
    r = defaults_drawn
    perf, comm = r.tables[PERF], r.tables[COMM]
    drawn = r.plots
    for x in r.analysis.experiments:
        label = x.label
        assert perf[label]["Avg throughput (img/s)"] == f"{drawn['throughput_comparison.png'][label]:.1f}"
        assert perf[label]["Avg train time/epoch (s)"] == f"{drawn['training_time_comparison.png'][label]:.2f}"
        bar = drawn["communication_overhead.png"][label]
        assert comm[label]["Comm overhead (ms/step)"] == f"{1e3 * bar['overhead']:.1f}"
        assert comm[label]["Spread min-max (ms)"] == f"{1e3 * bar['lo']:.1f} to {1e3 * bar['hi']:.1f}"
        # The breakdown's bar is the measured step; its overhead share is the table's and the sentence's.
        b = drawn["time_breakdown.png"][label]
        assert sum(b["parts"].values()) == pytest.approx(x.mean("batch_time"))
        assert b["step"] == pytest.approx(x.first.data["summary"]["avg_batch_time"])
        share = comm[label]["Share of step (%)"]
        assert f"overhead {share}% of the step" in b["text"]
        assert b["parts"]["communication overhead"] / (b["step"] - b["data"]) == pytest.approx(float(share) / 100,
                                                                                                abs=5e-4)
        line = r.line(f"{label}: communication overhead")
        assert f"communication overhead {comm[label]['Comm overhead (ms/step)']} ms per step" in line
        assert f"= {share}% of its" in line and f"scaling efficiency {comm[label]['Scaling efficiency (%)']}%" in line
        assert f"the epochs' measured step: {1e3 * b['step']:.1f} ms" in line
        # The hidden share: the cell and the sentence carry one verdict.
        hidden = comm[label]["Hidden behind backward (%)"]
        if x.kind == "all_reduce":
            assert hidden == "within noise" and "no measurable share is hidden here" in line, (hidden, line)
        else:
            assert hidden == "-" and "hidden" not in line
    loss = drawn["loss_curves.png"]
    assert "band" not in loss["title"] and not any(c["band"] for c in loss["curves"].values())  # one seed each
    assert drawn["accuracy_curves.png"]["left_out"] == []
    assert set(drawn["accuracy_curves.png"]["val"]) == set(perf)


def test_seeds_are_one_experiment_judged_against_their_spread(tmp_path):
    r = Text(setup_dir(tmp_path, SEEDS))
    perf = r.tables[PERF]
    assert list(perf) == ["Baseline DDP (2 seeds)", "Manual All-Reduce (overlap) (2 seeds)"]
    thr = [fixture(n)["summary"]["avg_train_throughput"] for n in SEEDS[:2]]
    assert perf["Baseline DDP (2 seeds)"]["Avg throughput (img/s)"] == \
        f"{statistics.mean(thr):.1f} ± {statistics.stdev(thr):.1f}"
    assert perf["Baseline DDP (2 seeds)"]["Seeds (n: values)"] == "2: 0, 1"
    # The same math: the difference between the methods is within the seed-to-seed spread.
    line = r.line("Loss curves: Manual All-Reduce")
    assert "within the seed-to-seed spread" in line and "they agree" in line, line
    # The ranking is judged against the seed spread, and the loss plot draws (and names) its band.
    line = r.line("Throughput at")
    assert "seed-to-seed spread" in line and ("within" in line or "beyond" in line), line
    loss = analysis.plots.plot_loss(r.experiments, analysis.plots.colours(r.experiments), tmp_path / "loss.png")
    assert "band: min-max over seeds" in loss["title"] and all(c["band"] for c in loss["curves"].values())


def test_a_manual_all_reduce_beyond_the_noise_floor_is_a_red_flag(tmp_path):
    extra = {}
    for name in SEEDS[2:]:
        wrong = fixture(name)
        for e in wrong["epochs"]:
            e["all_losses"] = [2 * x for x in e["all_losses"]]
        extra[name] = wrong
    r = Text(setup_dir(tmp_path, SEEDS[:2], extra))
    assert "RED FLAG" in r.report and "the seed-to-seed spread" in r.report


def with_step_noise(name, stdev, **summary):
    """A fixture whose epochs record step_time_stdev (seconds)."""
    data = fixture(name)
    for e in data["epochs"]:
        e["step_time_stdev"] = stdev
    data["summary"].update(summary)
    return data


def test_the_speed_ranking_is_judged_against_one_runs_step_noise(tmp_path):
    quiet = {n: with_step_noise(n, 1e-4) for n in DEFAULTS[:2]}
    r = Text(setup_dir(tmp_path / "quiet", (), quiet))
    # The standard error of the mean throughput from the steps' spread: T * stdev / sqrt(timed steps) / step.
    run = runs.load_run(tmp_path / "quiet" / "results" / DEFAULTS[1])
    expected = math.sqrt(sum((e["train_throughput"] * 1e-4 / math.sqrt(e["steps"] - e["warmup_steps"])
                              / e["avg_batch_time"]) ** 2 for e in run.epochs)) / len(run.epochs)
    assert run.throughput_se == pytest.approx(expected)
    line = r.line("Throughput at 2 processes")
    assert "1.14x Baseline DDP (185.0) (beyond the step-to-step noise" in line, line
    assert "step-time spread" not in r.report
    noisy = {n: with_step_noise(n, 0.2) for n in DEFAULTS[:2]}
    r = Text(setup_dir(tmp_path / "noisy", (), noisy))
    line = r.line("Throughput at 2 processes")
    assert "(within the step-to-step noise" in line and "no measurable ranking between the two" in line, line


def test_a_faster_method_with_the_larger_overhead_says_why(tmp_path):
    ar = with_step_noise(DEFAULTS[1], 1e-4)
    ar["comm_overhead"].update(overhead=0.2, overhead_min=0.19, overhead_max=0.21)
    r = Text(setup_dir(tmp_path, (), {DEFAULTS[0]: with_step_noise(DEFAULTS[0], 1e-4), DEFAULTS[1]: ar}))
    line = r.line("Rankings disagree at 2 processes")
    assert line.startswith("- Rankings disagree at 2 processes: Manual All-Reduce (overlap) has the highest "
                           "throughput, yet a larger communication overhead than Baseline DDP"), line
    assert "beyond the step-to-step noise" in line and "beyond the pairs' spread" in line
    assert "fixed batch before epoch 1" in line and "data loading" in line
    # Without a throughput lead beyond noise there is no ranking to disagree with.
    noisy = copy.deepcopy(ar)
    for e in noisy["epochs"]:
        e["step_time_stdev"] = 0.5
    r = Text(setup_dir(tmp_path / "n", (), {DEFAULTS[0]: with_step_noise(DEFAULTS[0], 0.5), DEFAULTS[1]: noisy}))
    assert "Rankings disagree" not in r.report


def test_a_kit_run_without_the_yardstick_shows_dashes_and_says_why(tmp_path):
    bare = fixture(DEFAULTS[1])
    del bare["comm_overhead"], bare["summary"]["scaling_efficiency"]  # as --overhead-pairs 0 writes it
    for e in bare["epochs"]:
        del e["scaling_efficiency"]
    r = Text(setup_dir(tmp_path, DEFAULTS[:1], {DEFAULTS[1]: bare}))
    row = r.tables[COMM]["Manual All-Reduce (overlap)"]
    assert {k: v for k, v in row.items() if k != "Method"} == dict.fromkeys(list(row)[1:], "-")
    assert r.tables[OWN]["Manual All-Reduce (overlap)"]["All-Reduce wait (ms)"] == \
        f"{1e3 * bare['summary']['avg_comm_time']:.1f}"
    missing = r.report.split("Not measured by these runs")[1]
    assert "results_all_reduce.json: communication overhead (the kit's yardstick) (--overhead-pairs 0" in missing
    assert "Manual All-Reduce (overlap): communication overhead" not in r.report
    assert "Rankings disagree" not in r.report


def test_a_hidden_share_is_a_percentage_only_beyond_noise(tmp_path):
    """The overlap's hidden share: within noise, nothing to hide (a one-process run), the overlap costing more,
    or a real share: the table cell and the sentence agree and never show a negative or meaningless share."""
    cases = {  # (overhead, min, max, blocking, min, max) -> the cell and the sentence's words
        "one_process": ((9e-4, 5e-4, 1.2e-3, 1e-4, -1e-4, 3e-4), "n/a (nothing to hide)", "no communication here"),
        "costs_more": ((0.05, 0.048, 0.052, 0.03, 0.029, 0.031), "none (overlap costs more)", "the overlap costs more"),
        "hides": ((0.01, 0.009, 0.011, 0.04, 0.039, 0.041), "75", "75% is hidden behind backward"),
        "noise": ((0.05, 0.03, 0.07, 0.04, 0.039, 0.041), "within noise", "no measurable share is hidden"),
    }
    for name, ((o, olo, ohi, b, blo, bhi), cell, words) in cases.items():
        data = fixture(DEFAULTS[1])
        data["comm_overhead"].update(overhead=o, overhead_min=olo, overhead_max=ohi, blocking_overhead=b,
                                     blocking_overhead_min=blo, blocking_overhead_max=bhi, hidden_share=1 - o / b)
        x = runs.group([runs.Run(data, Path(name), "all_reduce", "kind")])[0]
        table = analysis.tables.yardstick_table([x])
        h = analysis.verdicts.hidden(x)
        assert table.rows[0]["Hidden behind backward (%)"] == h.cell == cell, name
        assert words in h.words, (name, h.words)
        assert not re.search(r"-\d+%", h.words) and not h.cell.startswith("-"), name


def test_variants_are_identified_by_content(tmp_path):
    ring = fixture("results_all_reduce_ring.json")  # named anything: kind and sync say what it is
    r = Text(setup_dir(tmp_path, DEFAULTS + ("results_ps_p2p.json",), {"mystery.json": ring}))
    perf = r.tables[PERF]
    assert list(perf) == [f"{m} [{n} proc]" for m, n in (
        ("Baseline DDP", 2), ("Manual All-Reduce (overlap)", 2), ("Manual All-Reduce (ring)", 2),
        ("Parameter Server (collective)", 3), ("Parameter Server (p2p)", 3))]
    assert perf["Manual All-Reduce (ring) [2 proc]"]["Avg throughput (img/s)"] == \
        f"{ring['summary']['avg_train_throughput']:.1f}"
    p2p, coll = fixture("results_ps_p2p.json"), fixture("results_ps.json")
    ratio = coll["comm_overhead"]["overhead"] / p2p["comm_overhead"]["overhead"]
    assert f"collective communication overhead is {ratio:.2f}x the guide's per-tensor p2p" in r.report
    assert "a star: every step the server sends" in r.report  # p2p's sentence, not the collective's


def test_the_link_bound_comes_from_the_measured_bytes(tmp_path):
    names = ("results_baseline_ddp.json", "results_all_reduce_bucketed.json", "results_ps_p2p.json")
    collective = fixture("results_ps_p2p.json", FIXTURES / "cluster")  # the same bytes, as if by collectives
    collective.update(comm="collective")
    r = analyze(tmp_path, setup_dir(tmp_path, names, {"results_ps_collective.json": collective},
                                    source=FIXTURES / "cluster"))
    assert r.rc == 0
    link = r.tables[LINK]
    for name, kind in zip(names, ("baseline_ddp", "all_reduce", "ps")):
        data = json.loads((FIXTURES / "cluster" / name).read_text())
        sent = statistics.mean(e["link"]["sent_bytes_per_step"] for e in data["epochs"])
        received = statistics.mean(e["link"]["received_bytes_per_step"] for e in data["epochs"])
        # An all-reduce sends and receives at once; the p2p star's server pulls, then pushes.
        seconds = (sent + received if kind == "ps" else max(sent, received)) * 8 / data["network"]["link_rate_bits"]
        label = next(k for k in link if k.startswith({"baseline_ddp": "Baseline", "all_reduce": "Manual",
                                                      "ps": "Parameter Server (p2p)"}[kind]))
        assert link[label]["Busiest link sent / received per step (MB)"] == f"{sent / 1e6:.1f} / {received / 1e6:.1f}"
        assert link[label]["Time at link rate (ms)"] == f"{1e3 * seconds:.1f}"
        assert link[label]["Comm overhead / link time"] == f"{data['comm_overhead']['overhead'] / seconds:.2f}x"
        # The least a method moves: the all-reduce bound 2(M-1)/M x gradients, the star's copies; measured ~1x.
        assert 0.98 < float(link[label]["Measured / least"].rstrip("x")) < 1.05, link[label]
    # A collective server may send and receive at once: only the larger direction is a bound, and one copy
    # per worker is no bound at all.
    row = link["Parameter Server (collective) [3 proc]"]
    assert row["Directions counted"] == "both directions at once: the larger"
    assert "one server: at least 1 x state each way" in row["Least the method moves (MB per direction)"]
    assert "star: 2 nodes, each on its own 100mbit link" in r.report and "star: 3 nodes" in r.report
    assert "Link bound, Parameter Server (p2p) [3 proc]" in r.report and "pull, then push" in r.report
    assert "measured on the 100mbit links: the busiest node link sent" in r.report
    check_plots(r.out)


def test_compression_is_weighed_against_its_plain_variant(tmp_path):
    names = ("results_baseline_ddp.json", "results_baseline_ddp_fp16.json", "results_all_reduce.json",
             "results_all_reduce_fp16.json")
    r = analyze(tmp_path, setup_dir(tmp_path, names))
    assert r.rc == 0
    trade = r.tables["Speed and accuracy"]
    fp16 = fixture("results_all_reduce_fp16.json")
    assert trade["Manual All-Reduce (overlap, fp16)"]["Bytes on the wire per step (MB)"] == \
        f"{fp16['wire_bytes_per_step'] / 1e6:.1f}"
    assert fp16["wire_bytes_per_step"] * 2 == fixture("results_all_reduce.json")["wire_bytes_per_step"]
    for label in ("Baseline DDP (fp16) against Baseline DDP", "Manual All-Reduce (overlap, fp16) against Manual "
                  "All-Reduce (overlap)"):
        line = r.line(f"{label}:")
        assert "on this link it" in line and "final val accuracy" in line, line
    check_plots(r.out, ["speed_vs_accuracy.png"])


def test_bucket_sizes_and_world_sizes_give_their_plots(tmp_path):
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
    r = analyze(tmp_path, setup_dir(tmp_path, DEFAULTS, extra))
    assert r.rc == 0
    perf = r.tables[PERF]
    assert "Baseline DDP (1 MiB buckets) [2 proc]" in perf and "Manual All-Reduce (overlap, 100 MiB buckets) [2 proc]" in perf
    assert perf["Baseline DDP [4 proc]"]["Relative speedup"] == "1.00x (baseline)"
    assert "Scaling Baseline DDP (none): " in r.report and "(90% of linear in trainers)" in r.report
    check_plots(r.out, ["bucket_size.png", "scaling.png"])


def test_malformed_and_partial_files_are_named_and_skipped(tmp_path):
    text = (FIXTURES / "results_ps.json").read_text()
    bad_epoch = fixture("results_all_reduce_ring.json")
    del bad_epoch["epochs"][1]["train_throughput"]
    extra = {"results_ps.json": text[: len(text) // 2], "results_empty.json": "", "results_list.json": "[1, 2]",
             "results_all_reduce.json": {**fixture("results_all_reduce.json"), "epochs": [], "status": "incomplete"},
             "results_all_reduce_ring.json": bad_epoch, "results_alien.json": {"kind": "horovod"}}
    r = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",), extra))
    assert r.rc == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 6, lines
    for name, why in (("results_ps.json", "not valid JSON"), ("results_empty.json", "not valid JSON"),
                      ("results_list.json", "not a JSON object"), ("results_all_reduce.json", "no finished epoch"),
                      ("results_all_reduce_ring.json", "epoch 2 lacks valid train_throughput"),
                      ("results_alien.json", "unknown method kind 'horovod'")):
        assert any(line.startswith(f"skipped {name}: ") and why in line for line in lines), (name, lines)
        assert re.search(rf"^  - {re.escape(name)}: .*{why}", r.report, re.M), name  # one line each
    assert list(r.tables[PERF]) == ["Baseline DDP"]
    assert "Skipped files: 6" in r.report
    check_plots(r.out)


def test_every_json_file_is_looked_at_and_judged_by_its_content(tmp_path, monkeypatch):
    """--output out/sub/my_ddp.json is read whatever its name; a profiler trace, the bench's figures.json and
    a huge non-results file are named with the reason, and the trace is never parsed in full."""
    trace = '{\n  "schemaVersion": 1,\n  "traceEvents": [\n' + '{"ph": "X", "dur": 1},\n' * 2000  # cut short
    huge = '{"rows": [' + "0, " * 5000 + "0]}"
    r = analyze(tmp_path, setup_dir(tmp_path, (), {
        "my_ddp.json": fixture("results_baseline_ddp.json"), "trace_my_ddp.json": trace,
        "figures.json": {"DDP": [{"throughput": 1.0}]}, "dump.json": huge}, folder="out/sub"))
    assert r.rc == 0 and list(r.tables[PERF]) == ["Baseline DDP"]
    lines = dict(line.split(": ", 1) for line in r.stderr.strip().splitlines())
    assert set(lines) == {"skipped trace_my_ddp.json", "skipped figures.json", "skipped dump.json"}
    assert lines["skipped trace_my_ddp.json"].startswith("a profiler trace")  # not "not valid JSON": not parsed
    assert lines["skipped figures.json"].startswith("not a results file")
    for name in ("trace_my_ddp.json", "figures.json", "dump.json"):
        assert re.search(rf"^  - {re.escape(name)}: ", r.report, re.M), name
    monkeypatch.setattr(runs, "READ_LIMIT_BYTES", 1000)  # as if dump.json were over the size a results file has
    assert "not read in full" in runs.peek(tmp_path / "out" / "sub" / "dump.json")


def test_incomplete_run_is_marked_everywhere(tmp_path):
    partial = fixture("results_all_reduce.json")
    partial.update(status="incomplete", epochs=partial["epochs"][:1], summary={})
    r = analyze(tmp_path, setup_dir(tmp_path, ("results_baseline_ddp.json",), {"results_all_reduce.json": partial}))
    assert r.rc == 0
    perf = r.tables[PERF]
    label = "Manual All-Reduce (overlap) (incomplete)"
    assert label in perf and label in r.stdout
    assert perf[label]["Avg throughput (img/s)"] == f"{partial['epochs'][0]['train_throughput']:.1f}"
    assert "results_all_reduce.json has status 'incomplete' with 1 epoch(s) recorded" in r.report
    assert "Throughput at 2 processes" not in r.report  # an incomplete run is not ranked
    check_plots(r.out)


def test_two_files_of_the_same_seed_are_told_apart_by_name(tmp_path):
    again = fixture("results_ps.json")
    again["summary"]["avg_train_throughput"] = 99.0
    xs, _ = runs.load_folder(setup_dir(tmp_path, extra={"results_ps_again.json": again}))
    throughput = analysis.tables.performance_table(xs).column("Avg throughput (img/s)")
    assert throughput["Parameter Server (collective) [3 proc] <results_ps_again.json>"] == "99.0"
    assert "Parameter Server (collective) [3 proc] <results_ps.json>" in throughput


def test_a_synthetic_run_stays_out_of_the_accuracy_plot(tmp_path):
    synthetic = fixture("results_all_reduce.json")
    synthetic["args"]["synthetic"] = True
    synthetic["accuracy_note"] = "synthetic data: accuracy is meaningless"
    xs = runs.group([runs.load_run(p) for p in (FIXTURES / "results_baseline_ddp.json",)]
                    + [runs.Run(synthetic, Path("results_all_reduce.json"), "all_reduce", "kind")])
    drawn = analysis.plots.plot_accuracy(xs, analysis.plots.colours(xs), tmp_path / "accuracy_curves.png")
    assert drawn["left_out"] == ["Manual All-Reduce (overlap)"] and list(drawn["val"]) == ["Baseline DDP"]
    assert "--synthetic" in drawn["note"]
    assert analysis.tables.performance_table(xs).column("Best accuracy (%)")["Manual All-Reduce (overlap)"] == \
        "n/a (synthetic)"


def test_no_results_is_one_line_error_naming_what_was_skipped(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results_broken.json").write_text("{")
    (empty / "my_ddp.json").write_text(json.dumps({"method": "Baseline DDP (PyTorch)", "world_size": 2}))
    for folder in (empty, tmp_path / "missing"):
        proc = subprocess.run([sys.executable, str(REPO / "analyze_results.py"), "--results-dir", str(folder),
                               "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        if folder == empty:
            assert "results_broken.json: not valid JSON" in errors[0]
            assert "my_ddp.json: missing or invalid 'batch_size'" in errors[0]
    assert not (tmp_path / "out" / "plots").exists()


def test_the_analysis_does_not_import_torch(tmp_path):
    """With torch unimportable, the whole analysis runs (on the guide's files mixed with the kit's)."""
    results = setup_dir(tmp_path, DEFAULTS, {f"guide_{n}": fixture(n, GUIDE) for n in GUIDE_FILES})
    code = ("import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
            "import analyze_results, analysis, analysis.plots, analysis.report\n"
            f"sys.exit(analyze_results.main(['--results-dir', {str(results)!r}, '--out-dir', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Parameter Server (guide file) [4 proc]" in (tmp_path / "performance_report.txt").read_text()
    check_plots(tmp_path)


# --------------------------------------------------------------------------- the guide's own files
GUIDE_FILES = ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json")


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guide")
    return analyze(tmp, setup_dir(tmp, GUIDE_FILES, source=GUIDE))


def test_the_guides_own_files_are_analysed(guide):
    r = guide
    assert r.rc == 0 and r.stderr == ""
    perf, comm, own = r.tables[PERF], r.tables[COMM], r.tables[OWN]
    labels = ["Baseline DDP", "Manual All-Reduce", "Parameter Server"]
    assert list(perf) == labels
    ddp, ar, ps = (fixture(n, GUIDE) for n in GUIDE_FILES)
    for label, data in zip(labels, (ddp, ar, ps)):
        assert perf[label]["Avg throughput (img/s)"] == f"{data['summary']['avg_train_throughput']:.1f}"
        assert perf[label]["Avg train time/epoch (s)"] == f"{data['summary']['avg_train_time_per_epoch']:.2f}"
        assert perf[label]["Seeds (n: values)"] == "1: -"
        # No yardstick in a guide file: every one of its cells is "-", never a default.
        assert set(comm[label].values()) == {label, "-"}, comm[label]
    assert perf["Baseline DDP"]["Best accuracy (%)"] == f"{ddp['summary']['best_val_accuracy']:.2f}"
    assert perf["Manual All-Reduce"]["Best accuracy (%)"] == "-"  # the guide's all-reduce file has no val_*
    assert perf["Manual All-Reduce"]["Relative speedup"] == \
        f"{ar['summary']['avg_train_throughput'] / ddp['summary']['avg_train_throughput']:.2f}x"
    assert perf["Parameter Server"]["Trainers x batch"] == "3 x 64 (+1 server)"  # num_workers
    # The scripts' own timers are shown as theirs.
    assert own["Parameter Server"]["Param pull (ms)"] == f"{1e3 * ps['summary']['avg_comm_time_pull']:.1f}"
    assert own["Parameter Server"]["Grad push (ms)"] == f"{1e3 * ps['summary']['avg_comm_time_push']:.1f}"
    assert own["Manual All-Reduce"]["All-Reduce wait (ms)"] == \
        f"{1e3 * statistics.mean(e['avg_comm_time'] for e in ar['epochs']):.1f}"
    # The report says what these files lack, once per file, and that the yardstick needs the kit's scripts.
    assert "only the kit's scripts measure it" in r.report
    missing = r.report.split("Not measured by these runs")[1]
    for name in GUIDE_FILES:
        assert missing.count(name) == 1, name
    line = next(x for x in missing.splitlines() if "results_all_reduce.json" in x)
    assert "validation accuracy" in line and "seed" in line and "communication overhead" in line
    assert "no status and no end_time: counted complete" in line
    assert "end_time set: counted complete" in missing
    assert "Throughput at 4 processes: Baseline DDP has the highest" in r.report
    # The guide's five plots: the per-epoch (all-reduce) and top-level (DDP, PS) losses are all drawn.
    check_plots(r.out)
    curves = r.plots["loss_curves.png"]["curves"]
    assert {k: v["steps"] for k, v in curves.items()} == {label: 30 for label in labels}
    assert list(r.plots["accuracy_curves.png"]["val"]) == ["Baseline DDP", "Parameter Server"]
    assert r.plots["communication_overhead.png"]["Parameter Server"] == {
        "own_timer": pytest.approx(ps["summary"]["avg_comm_time_pull"] + ps["summary"]["avg_comm_time_push"])}
    assert "overhead not measured" in r.plots["time_breakdown.png"]["Baseline DDP"]["text"]


def test_guide_files_mixed_with_the_kits(tmp_path):
    r = Text(setup_dir(tmp_path, DEFAULTS, {f"guide_{n}": fixture(n, GUIDE) for n in GUIDE_FILES}))
    perf, comm = r.tables[PERF], r.tables[COMM]
    assert list(perf) == ["Baseline DDP [2 proc]", "Baseline DDP (guide file) [4 proc]",
                          "Manual All-Reduce (overlap) [2 proc]", "Manual All-Reduce (guide file) [4 proc]",
                          "Parameter Server (collective) [3 proc]", "Parameter Server (guide file) [4 proc]"]
    assert comm["Baseline DDP [2 proc]"]["Comm overhead (ms/step)"] == \
        f"{1e3 * fixture(DEFAULTS[0])['comm_overhead']['overhead']:.1f}"
    assert comm["Parameter Server (guide file) [4 proc]"]["Comm overhead (ms/step)"] == "-"
    assert perf["Manual All-Reduce (guide file) [4 proc]"]["Relative speedup"] == \
        f"{495.6 / 510.2:.2f}x"  # against the guide's DDP of its own world size
    assert "PS (Parameter Server (guide file) [4 proc]): one server and 3 workers" in r.report


@pytest.mark.parametrize("data, name, kind", [
    ({"kind": "ps", "method": "Baseline DDP (PyTorch)"}, "x.json", "ps"),  # the kind field first
    ({"method": "Baseline DDP (PyTorch)"}, "x.json", "baseline_ddp"),
    ({"method": "baseline ddp"}, "x.json", "baseline_ddp"),
    ({"method": "Manual AllReduce (ring)"}, "x.json", "all_reduce"),
    ({"method": "Manual All-Reduce"}, "x.json", "all_reduce"),
    ({"method": "Parameter Server (PS)"}, "x.json", "ps"),
    ({"method": "PS, sharded"}, "x.json", "ps"),
    ({"method": "parameter-server"}, "x.json", "ps"),
    ({}, "results_all_reduce_ring.json", "all_reduce"),  # else the file name
    ({"method": "something else"}, "results_baseline_ddp_seed3.json", "baseline_ddp"),
])
def test_the_method_comes_from_kind_then_method_then_file_name(data, name, kind):
    assert runs.method_of(data, name)[0] == kind


def test_an_unknown_method_is_refused():
    for data, name in (({"kind": "horovod"}, "results_ps.json"), ({"method": "Horovod"}, "x.json")):
        with pytest.raises(ValueError, match="unknown method"):
            runs.method_of(data, name)


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


@pytest.mark.parametrize("name", GUIDE_FILES)
def test_the_guide_fixtures_have_the_guides_fields_and_none_of_the_kits(name):
    data = fixture(name, GUIDE)
    kind = runs.method_of(data, "x.json")[0]
    top, epoch, summary = GUIDE_FIELDS[kind]
    assert set(top) <= set(data) and set(summary) <= set(data["summary"])
    assert all(set(epoch) <= set(e) for e in data["epochs"])
    assert not {"kind", "seed", "trainers", "status", "comm_overhead", "args"} & set(data)


# --------------------------------------------------------------------------- fields the training side adds (hand)
HAND = FIXTURES / "hand"
HAND_LOOPBACK = ("results_baseline_ddp.json", "results_all_reduce.json", "results_ps.json")
RANKS, DDP_TIMERS, RECOVERY = "Which rank held the others back", "DDP's own timers beside the yardstick", \
    "Restarts and checkpoints"


def mean_of(epochs, get):
    return statistics.mean(get(e) for e in epochs)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """The loopback defaults with rank_compute, ddp_logging, restarts and checkpoints, analysed once with plots."""
    tmp = tmp_path_factory.mktemp("hand")
    return analyze(tmp, setup_dir(tmp, HAND_LOOPBACK, source=HAND / "loopback"))


def test_the_slow_rank_is_named_with_the_runs_own_figures(hand):
    r = hand
    assert r.rc == 0 and r.stderr == ""
    table, drawn = r.tables[RANKS], r.plots["rank_compute.png"]
    ddp, ar, ps = (fixture(n, HAND / "loopback") for n in HAND_LOOPBACK)
    labels = ["Baseline DDP [2 proc]", "Manual All-Reduce (overlap) [2 proc]",
              "Parameter Server (collective) [3 proc]"]
    assert list(table) == list(drawn) == labels
    for label, data in zip(labels, (ddp, ar, ps)):
        rc = [e["rank_compute"] for e in data["epochs"]]
        median = statistics.mean(x["median"] for x in rc)
        assert table[label]["Median compute (ms/step)"] == f"{1e3 * median:.1f}"
        assert drawn[label]["median"] == pytest.approx(median)
        assert drawn[label]["ranks"] == rc[0]["ranks"]
        for i in range(len(rc[0]["ranks"])):  # the bars: each rank's compute and stdev, mean over the epochs
            assert drawn[label]["compute"][i] == pytest.approx(statistics.mean(x["compute"][i] for x in rc))
            assert drawn[label]["stdev"][i] == pytest.approx(statistics.mean(x["stdev"][i] for x in rc))
    # DDP: rank 1 in both epochs; the cell, the sentence and the plot carry the file's figures.
    straggler_named_as_written(r, table, drawn, labels[0], ddp, 1, "epochs 1-2")
    assert f"of the epochs' measured step of {1e3 * ddp['summary']['avg_batch_time']:.1f} ms" in \
        r.line("Slow rank, Baseline DDP [2 proc]")
    # The PS: rank 2 only in epoch 2, named with that epoch's figures.
    straggler_named_as_written(r, table, drawn, labels[2], ps, 2, "epoch 2")
    # The all-reduce: no straggler, and it says so with its slowest rank against the other's compute.
    rc = [e["rank_compute"] for e in ar["epochs"]]
    slowest = statistics.mean(x["compute"][1] for x in rc) / statistics.mean(x["compute"][0] for x in rc)
    assert table[labels[1]]["Slowest rank (x others' median)"] == f"rank 1: {slowest:.2f}x (not a straggler)"
    assert table[labels[1]]["Others waited for it (ms/step)"] == "none (no straggler)"
    line = r.line("Slow rank, Manual All-Reduce")
    assert "no rank was slower than the others beyond the noise in epochs 1-2" in line
    assert f"rank 1, computed {slowest:.2f}x the others' median" in line
    assert drawn[labels[1]]["stragglers"] == {}
    check_plots(r.out, ["rank_compute.png"])
    assert "per-rank compute" not in r.report.split("Analysis (computed")[1]  # every file measured it


def straggler_named_as_written(r, table, drawn, label, data, rank, epochs):
    """The straggler's cell, sentence and plot label carry its records' figures (means over the epochs it was
    named in): its compute, the others' median (its compute - cost_per_step), ratio and cost."""
    named = [e["rank_compute"]["straggler"] for e in data["epochs"] if e["rank_compute"]["straggler"]]
    assert {s["rank"] for s in named} == {rank}
    ratio, compute, cost = (statistics.mean(s[k] for s in named) for k in ("ratio", "compute", "cost_per_step"))
    others = statistics.mean(s["compute"] - s["cost_per_step"] for s in named)
    assert table[label]["Slowest rank (x others' median)"] == f"rank {rank}: {ratio:.2f}x ({epochs})"
    assert table[label]["Others waited for it (ms/step)"] == f"{1e3 * cost:.1f}"
    line = r.line(f"Slow rank, {label}")
    assert (f"rank {rank} computed {ratio:.2f}x the others' median ({1e3 * compute:.0f} ms vs {1e3 * others:.0f} ms "
            f"per step) in {epochs}; the others waited ~{1e3 * cost:.0f} ms per step for it") in line, line
    if drawn is not None:
        assert drawn[label]["stragglers"] == {rank: pytest.approx(ratio)}


def test_a_straggler_among_four_is_held_against_the_others_median():
    r = Text(HAND / "hier")
    data = fixture("results_all_reduce_hierarchical.json", HAND / "hier")
    e = data["epochs"][0]["rank_compute"]
    others = statistics.median(c for k, c in zip(e["ranks"], e["compute"]) if k != 2)
    assert e["straggler"]["compute"] - e["straggler"]["cost_per_step"] == pytest.approx(others)
    straggler_named_as_written(r, r.tables[RANKS], None, "Manual All-Reduce (hierarchical)", data, 2, "epochs 1-2")
    assert list(r.tables[RANKS]) == ["Manual All-Reduce (hierarchical)"]  # the others did not measure it


def test_ddps_own_timers_beside_the_yardstick(hand):
    r = hand
    ddp = fixture(HAND_LOOPBACK[0], HAND / "loopback")
    row = r.tables[DDP_TIMERS]["Baseline DDP [2 proc]"]
    assert list(r.tables[DDP_TIMERS]) == ["Baseline DDP [2 proc]"]  # DDP rows only
    logged = ddp["epochs"][-1]["ddp_logging"]  # DDP's averages since the run began: the last epoch's are the run's
    comm, overlap = logged["avg_backward_comm_time"], logged["avg_backward_compute_comm_overlap_time"]
    assert row["Yardstick overhead (ms/step)"] == f"{1e3 * ddp['comm_overhead']['overhead']:.1f}" == \
        r.tables[COMM]["Baseline DDP [2 proc]"]["Comm overhead (ms/step)"]
    assert row["DDP backward comm (ms)"] == f"{1e3 * comm:.1f}"
    assert row["Overlapped with backward compute (ms)"] == f"{1e3 * overlap:.1f}"
    assert row["Exposed (ms)"] == f"{1e3 * (comm - overlap):.1f}"
    assert row["Backward compute (ms)"] == f"{1e3 * logged['avg_backward_compute_time']:.1f}"
    assert row["Forward compute (ms)"] == f"{1e3 * logged['avg_forward_compute_time']:.1f}"
    line = r.line("DDP's own timers, Baseline DDP [2 proc]")
    assert f"{1e3 * comm:.1f} ms of backward communication per step" in line
    assert f"{1e3 * overlap:.1f} ms of it overlapping backward compute ({1e3 * (comm - overlap):.1f} ms exposed)" \
        in line
    assert f"the yardstick's overhead: {row['Yardstick overhead (ms/step)']} ms" in line
    assert r.report.count("costs DDP time but no yardstick time") == 1  # one sentence (the note: report_tables.md)
    assert "costs DDP time but no yardstick time" in (r.out / "report_tables.md").read_text()


def test_restarts_and_checkpoints_are_counted_per_run(hand):
    r = hand
    ar = fixture(HAND_LOOPBACK[1], HAND / "loopback")
    table = r.tables[RECOVERY]
    row = table["Manual All-Reduce (overlap) [2 proc]"]  # still one run, complete: no "(incomplete)"
    restarts = ar["restarts"]
    checkpoint = sum(e["checkpoint_time"] for e in ar["epochs"])
    loop = sum(e["train_time"] for e in ar["epochs"])
    assert row["Restarts"] == str(len(restarts))
    assert row["Steps redone"] == str(sum(x["steps_redone"] for x in restarts))
    assert "seconds_lost" not in restarts[1]  # the second attempt failed again before it was back
    assert row["Time lost (s)"] == f"{restarts[0]['seconds_lost']:.1f} (+1 not recorded)"
    assert row["Checkpoints (share of the training loop)"] == \
        f"{checkpoint:.2f} s ({100 * checkpoint / loop:.1f}%, {sum(e['checkpoints'] for e in ar['epochs'])} written)"
    assert table["Baseline DDP [2 proc]"]["Restarts"] == "none recorded"
    line = r.line("Restarts and checkpoints, Manual All-Reduce (overlap) [2 proc]")
    x, y = restarts
    assert (f"2 restarts (attempt 1 at {x['time']} resumed from step {x['resumed_from_step']} after reaching step "
            f"{x['last_step_before']}; attempt 2 at {y['time']} resumed from step {y['resumed_from_step']} after "
            f"reaching step {y['last_step_before']}): {x['steps_redone'] + y['steps_redone']} steps redone, "
            f"{x['seconds_lost']:.1f} s (+1 not recorded) lost") in line, line
    assert f"took {checkpoint:.2f} s (2 checkpoints) of the {loop:.1f} s training loop " \
        f"({100 * checkpoint / loop:.1f}%)" in line
    assert "Throughput at 2 processes: Manual All-Reduce (overlap) [2 proc] has the highest" in r.report  # ranked


def without_new_fields(name):
    """A hand-made loopback file with the fields the training side is adding taken out: an older kit file."""
    data = fixture(name, HAND / "loopback")
    data.pop("restarts", None)
    for e in data["epochs"]:
        for key in ("rank_compute", "ddp_logging", "checkpoint_time", "checkpoints"):
            e.pop(key, None)
    return data


def test_runs_without_the_new_fields_show_them_as_not_measured_once(tmp_path, guide):
    older = analyze(tmp_path, setup_dir(tmp_path, (), {n: without_new_fields(n) for n in HAND_LOOPBACK}))
    for r, names in ((older, HAND_LOOPBACK), (guide, GUIDE_FILES)):
        missing = r.report.split("Not measured by these runs")[1].splitlines()
        for name in names:  # each file on one line, each figure it lacks named once there
            lines = [x for x in missing if re.search(rf"[ ,]{re.escape(name)}[ ,:]", x)]
            assert len(lines) == 1 and lines[0].count("per-rank compute (rank_compute") == 1, (name, lines)
            assert lines[0].count("DDP's own communication timers") == (name == names[0]), (name, lines)
        for title in (RANKS, DDP_TIMERS, RECOVERY):
            assert title not in r.tables
        assert "Slow rank" not in r.report and "Restarts and checkpoints" not in r.report
        assert not {"rank_compute.png", "scaling_cluster.png"} & {p.name for p in (r.out / "plots").iterdir()}
    # A guide file has no yardstick: no physical limit either (its cells are dashes, named once as the yardstick).
    assert "Physical limit," not in guide.report
    assert guide.tables[COMM]["Baseline DDP"]["Limit / step (fixed batch)"] == "-"


def test_every_method_against_its_physical_limit(tmp_path, defaults):
    """The limit and the step it is held against come from one measurement: the yardstick's fixed batch."""
    # Loopback: no declared link, the limit is the compute alone (the step without communication).
    for label, name in zip(defaults.tables[COMM], DEFAULTS):
        data = fixture(name)
        compute, step = data["comm_overhead"]["local_step_time"], data["comm_overhead"]["step_time"]
        row = defaults.tables[COMM][label]
        assert row["Physical limit (ms/step)"] == f"{1e3 * compute:.1f} (compute)"
        assert row["Limit / step (fixed batch)"] == f"{compute / step:.2f}"
        line = defaults.line(f"Physical limit, {label}")
        assert "no declared link (loopback), so the limit is the compute alone" in line
        assert f"reaches {compute / step:.2f} of the limit" in line and f"{1e3 * step:.1f} ms" in line
    # The emulated cluster: the link time of the measured bytes, by links.py's direction rule.
    names = ("results_baseline_ddp.json", "results_all_reduce_bucketed.json", "results_ps_p2p.json")
    r = Text(setup_dir(tmp_path / "cluster", names, source=FIXTURES / "cluster"))
    for label, name in zip(r.tables[COMM], names):
        data = fixture(name, FIXTURES / "cluster")
        sent, received = (mean_of(data["epochs"], lambda e: e["link"][f"{d}_bytes_per_step"])
                          for d in ("sent", "received"))
        link = (sent + received if "ps" in name else max(sent, received)) * 8 / data["network"]["link_rate_bits"]
        o = data["comm_overhead"]
        compute, step = o["local_step_time"], o["step_time"]
        limit = max(link, compute)
        row = r.tables[COMM][label]
        assert row["Physical limit (ms/step)"] == f"{1e3 * limit:.1f} ({'link' if link >= compute else 'compute'})"
        at = abs(step - limit) <= o["overhead_max"] - o["overhead_min"] if link >= compute else o["overhead_min"] <= 0
        assert row["Limit / step (fixed batch)"] == f"{limit / step:.2f}" + (" (at it, in noise)" if at else "")
        line = r.line(f"Physical limit, {label}")
        assert f"{1e3 * link:.1f} ms" in line and f"{limit / step:.2f}" in line, line
    # The first run's DDP: the epochs' step shorter than the yardstick's step without communication, the overhead
    # within noise of 0 (even negative): at the limit within noise, never "a measurement problem", no negative
    # share or ratio.
    healthy = fixture(DEFAULTS[0])
    healthy["comm_overhead"].update(local_step_time=1.04 * healthy["summary"]["avg_batch_time"], overhead=-0.0109,
                                    overhead_min=-0.03, overhead_max=0.012, overhead_share=-0.06)
    healthy["comm_overhead"]["step_time"] = healthy["comm_overhead"]["local_step_time"] - 0.0109
    r = Text(setup_dir(tmp_path / "healthy", (), {DEFAULTS[0]: healthy}))
    row = r.tables[COMM]["Baseline DDP"]
    assert row["Limit / step (fixed batch)"].endswith("(at it, in noise)") and row["Share of step (%)"] == "~0 (in noise)"
    assert "is at the limit within the pairs' spread" in r.line("Physical limit, Baseline DDP")
    assert "measurement problem" not in r.report and not NEGATIVE_RATIO.search(r.report)
    # Faster than the limit beyond the pairs' spread is impossible, and says so.
    odd = fixture(DEFAULTS[0])
    odd["comm_overhead"].update(local_step_time=1.25 * odd["comm_overhead"]["step_time"], overhead=-0.03,
                                overhead_min=-0.04, overhead_max=-0.02)
    r = Text(setup_dir(tmp_path / "odd", (), {DEFAULTS[0]: odd}))
    assert r.tables[COMM]["Baseline DDP"]["Limit / step (fixed batch)"] == "1.25 (beyond noise: a measurement problem)"
    assert "is shorter than that beyond the pairs' spread (limit / step = 1.25)" in r.line("Physical limit, Baseline DDP")


def test_cost_against_the_number_of_nodes(tmp_path):
    folder = HAND / "cluster"
    r = Text(folder)
    drawn = analysis.plots.plot_cluster(r.experiments, analysis.plots.colours(r.experiments), tmp_path / "c.png")
    assert matplotlib.image.imread(tmp_path / "c.png").std() > 0.01
    names = {"Baseline DDP at 100mbit": "results_baseline_ddp", "Manual All-Reduce (bucketed) at 100mbit":
             "results_all_reduce_bucketed", "Parameter Server (p2p) at 100mbit": "results_ps_p2p"}
    assert list(drawn) == list(names)
    for name, stem in names.items():
        files = [fixture(f"{stem}_{n}nodes.json", folder) for n in (2, 4, 8)]
        points = drawn[name]
        assert [p["nodes"] for p in points] == [2, 4, 8]
        for p, data in zip(points, files):
            n, rate = data["network"]["nodes"], data["network"]["link_rate_bits"]
            assert p["overhead"] == pytest.approx(data["comm_overhead"]["overhead"])
            assert p["bytes"] == pytest.approx(mean_of(data["epochs"], lambda e: max(e["link"].values())))
            if "ps" in stem:  # the star: (N-1) workers x state each way, pull then push
                assert p["bound"] == pytest.approx(2 * (n - 1) * data["state_bytes"] * 8 / rate)
            else:  # a flat ring: 2(N-1)/N x gradients
                assert p["bound"] == pytest.approx(2 * (n - 1) / n * data["wire_bytes_per_step"] * 8 / rate)
        a, b = points[0], points[-1]
        line = r.line(f"Cost against nodes, {name}")
        assert (f"communication overhead {1e3 * a['overhead']:.1f} ms per step at 2 nodes -> "
                f"{1e3 * b['overhead']:.1f} ms at 8 ({b['overhead'] / a['overhead']:.2f}x)") in line, line
        assert f"{1e3 * a['bound']:.1f} ms -> {1e3 * b['bound']:.1f} ms ({b['bound'] / a['bound']:.2f}x)" in line
        assert f"carried {a['bytes'] / 1e6:.1f} -> {b['bytes'] / 1e6:.1f} MB per step" in line
    assert "(star: (workers off the server's node) x state)" in r.line("Cost against nodes, Parameter Server")
    assert "(flat ring: 2(N-1)/N x gradients)" in r.line("Cost against nodes, Manual All-Reduce")
    assert runs.scaling_groups(r.experiments)  # scaling.png (throughput against processes) is still drawn


def test_a_flat_rings_bytes_beside_the_two_levels(tmp_path):
    folder = HAND / "hier"
    r = Text(folder)
    link = r.tables[LINK]
    cases = {"Baseline DDP": ("results_baseline_ddp.json", "flat ring"),
             "Manual All-Reduce (ring)": ("results_all_reduce_ring.json", "flat ring"),
             "Manual All-Reduce (hierarchical)": ("results_all_reduce_hierarchical.json", "two-level")}
    for label, (name, pattern) in cases.items():
        data = fixture(name, folder)
        n, m, wire = data["world_size"], data["network"]["nodes"], data["wire_bytes_per_step"]
        ring, two = 2 * (n - 1) / n * wire, 2 * (m - 1) / m * wire
        assert (n, m) == (4, 2)
        marked = (f"[{ring / 1e6:.1f}] / {two / 1e6:.1f}" if pattern == "flat ring" else
                  f"{ring / 1e6:.1f} / [{two / 1e6:.1f}]")
        assert link[label]["All-reduce pattern"] == pattern
        assert link[label]["Flat ring / two-level per node link (MB)"] == marked
        busiest = mean_of(data["epochs"], lambda e: max(e["link"].values()))
        line = r.line(f"Flat ring vs two-level, {label}")
        assert (f"a flat ring moves 2(N-1)/N = 1.50x the {wire / 1e6:.1f} MB of gradients through each node link "
                f"({ring / 1e6:.1f} MB per direction), the two-level all-reduce 2(M-1)/M = 1.00x "
                f"({two / 1e6:.1f} MB)") in line, line
        expected = ring if pattern == "flat ring" else two
        assert (f"used the {pattern} pattern and its busiest link carried {busiest / 1e6:.1f} MB per direction "
                f"({busiest / expected:.2f}x the {pattern}'s)") in line
    # DDP on nccl: NCCL picks ring or tree; neither figure is marked.
    nccl = fixture("results_baseline_ddp.json", folder)
    nccl["backend"] = "nccl"
    r = Text(setup_dir(tmp_path, (), {"results_baseline_ddp.json": nccl}))
    row = r.tables[LINK]["Baseline DDP"]
    assert row["All-reduce pattern"] == "nccl's choice"
    assert "[" not in row["Flat ring / two-level per node link (MB)"]
    assert "this run used nccl's choice (ring or tree)" in r.line("Flat ring vs two-level, Baseline DDP")
    # One process per node: the two patterns move the same, and the columns are not shown.
    r = Text(setup_dir(tmp_path / "one", ("results_baseline_ddp.json",), source=FIXTURES / "cluster"))
    assert "All-reduce pattern" not in next(iter(r.tables[LINK].values()))
    assert "Flat ring vs two-level" not in r.report


# --------------------------------------------------------------------------- the guide's answer, the first page
GUIDE_PERF = ["Method", "Avg throughput (img/s)", "Avg train time/epoch (s)", "Best accuracy (%)", "Relative speedup"]
GUIDE_COMM = ["Method", "Param pull (ms)", "Grad push (ms)", "All-Reduce (ms)", "Total comm (ms)"]
ALL_FIXTURES = tuple(sorted(p.name for p in FIXTURES.glob("results_*.json")))


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    """Every real fixture (three methods, their variants, two seeds of two), analysed through the command."""
    tmp = tmp_path_factory.mktemp("everything")
    return analyze(tmp, setup_dir(tmp, ALL_FIXTURES), via_main=True)


def first_page(report):
    return report.split("\n" + "=" * 24 + "\n")[0]


def test_the_first_page_is_the_guides_answer(everything):
    r = everything
    assert r.rc == 0
    page = first_page(r.raw)
    xs, _ = runs.load_folder(r.out.parent / "results")
    picks = analysis.answer.guide_rows(xs)
    assert [picks[k].label for k in runs.KINDS] == ["Baseline DDP [2 proc] (2 seeds)",
                                                    "Manual All-Reduce (overlap) [2 proc] (2 seeds)",
                                                    "Parameter Server (collective) [3 proc]"]
    perf, comm = analysis.answer.performance_table(picks), analysis.answer.comm_table(picks)
    # The guide's two tables, its columns and rows, every cell filled or dashed as the guide does.
    for table, columns in ((perf, GUIDE_PERF), (comm, GUIDE_COMM)):
        assert table.columns == columns
        assert [row["Method"] for row in table.rows] == ["Baseline DDP", "Manual All-Reduce", "Parameter Server"]
        assert all(row[c].strip() for row in table.rows for c in columns), table.rows
        assert analysis.tables.render_text(table) in page
    ddp, ar, ps = ({h: row[h] for h in row} for row in perf.rows)
    seeds = [fixture(n)["summary"]["avg_train_throughput"] for n in SEEDS[:2]]
    assert ddp["Avg throughput (img/s)"] == f"{statistics.mean(seeds):.1f} ± {statistics.stdev(seeds):.1f}"
    assert ddp["Relative speedup"] == "1.00x (baseline)"
    p = fixture("results_ps.json")["summary"]
    assert ps["Relative speedup"] == f"{p['avg_train_throughput'] / statistics.mean(seeds):.2f}x (vs DDP on 2)"
    assert ps["Best accuracy (%)"] == f"{p['best_val_accuracy']:.2f}"
    c = {row["Method"]: row for row in comm.rows}
    assert [c["Baseline DDP"][h] for h in GUIDE_COMM[1:]] == ["-", "-", "-", "(implicit, handled by PyTorch)"]
    assert c["Manual All-Reduce"]["Param pull (ms)"] == c["Manual All-Reduce"]["Grad push (ms)"] == "-"
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c["Manual All-Reduce"]["All-Reduce (ms)"])
    pull, push = 1e3 * p["avg_comm_time_pull"], 1e3 * p["avg_comm_time_push"]
    assert c["Parameter Server"]["Total comm (ms)"] == f"{pull:.2f} + {push:.2f} = {pull + push:.2f}"
    assert c["Parameter Server"]["All-Reduce (ms)"] == "-"
    # Then one paragraph per analysis point, in the guide's order, each sentence short, with its figure.
    starts = [page.index(f"\n{t}. ") for t in ("Throughput", "Convergence", "Communication efficiency",
                                                 "Scalability")]
    assert starts == sorted(starts) and page.index("Parameter Server ") < starts[0]
    said = analysis.answer.sentences(xs)
    for point, sentences in said.items():
        for s in sentences:
            pointer = re.search(r"run_all\.sh|plots/|--", s)  # what to run or look at next
            assert len(s) < 160 and (pointer or re.search(r"\d", s)), (point, s)
        text = " ".join(sentences)
        assert point == "Scalability" or re.search(r"\b(beyond|within)\b", text), (point, text)
    throughput = " ".join(said["Throughput"])
    assert "0.31x DDP: slower, beyond the seed-to-seed spread" in throughput
    assert "1.00x DDP: a tie within the seed-to-seed spread" in throughput
    communication = " ".join(said["Communication efficiency"])
    # The throughput verdict (PS slower beyond noise) and the overhead's (within the pairs' spread) are reconciled.
    assert "DDP trains faster than the PS beyond the seed-to-seed spread; the yardstick's" in communication
    assert "--cluster 4x1" in communication and "communication_overhead.png" in communication
    assert 'run_all.sh --sweep "2 4"' in " ".join(said["Scalability"])
    # The report and the terminal: the answer first, nothing over 120 columns, nothing a reader calls nonsense.
    assert r.stdout.startswith("The guide's answer (GUIDE.md Section 4.2)")
    assert first_page(r.stdout).strip() == page.split("\n", 3)[3].strip()
    for text in (r.raw, r.stdout):
        assert max(len(line) for line in text.splitlines()) <= 120
        assert not NEGATIVE_RATIO.search(text), NEGATIVE_RATIO.search(text)
        assert "measurement problem" not in text
    details = r.raw.split("=" * 24)[1]
    assert details.count("docs/reading_the_report.md") == 1 and (REPO / "docs" / "reading_the_report.md").exists()
    for t in r.tables:  # every Details table under its title and one-line caption
        assert re.search(rf"^{re.escape(t)}(: .+)?$\n(.+\n)?", details, re.M), t


@pytest.mark.parametrize("folder", [GUIDE, FIXTURES / "cluster", HAND / "cluster", HAND / "hier", HAND / "loopback"])
def test_every_fixture_folder_gives_a_first_page_that_fits(folder):
    r = Text(folder)
    page = first_page(r.raw)
    assert "Performance (GUIDE.md Section 4.2, first table)" in page and "Scalability. " in page
    assert max(len(line) for line in r.raw.splitlines()) <= 120
    assert not NEGATIVE_RATIO.search(r.raw) and "measurement problem" not in r.raw
    for sentences in analysis.answer.sentences(r.experiments).values():
        assert all(len(s) < 160 for s in sentences), sentences


def test_an_overhead_within_noise_of_zero_is_never_a_ratio(tmp_path):
    """The first run's case: DDP's overhead -10.9 ms (its pairs straddle 0), the PS's 177.4 ms."""
    ddp = fixture(DEFAULTS[0])
    ddp["comm_overhead"].update(overhead=-0.0109, overhead_min=-0.03, overhead_max=0.02, overhead_share=-0.07)
    ps = fixture(DEFAULTS[2])
    ps["comm_overhead"].update(overhead=0.1774, overhead_min=0.15, overhead_max=0.2)
    r = Text(setup_dir(tmp_path, (), {DEFAULTS[0]: ddp, DEFAULTS[2]: ps}))
    assert not NEGATIVE_RATIO.search(r.raw) and "-16.2" not in r.raw
    said = " ".join(analysis.answer.sentences(r.experiments)["Communication efficiency"])
    assert "DDP within noise of 0 (-10.9 ms)" in said
    assert "DDP's overhead is within noise of 0; the PS's is 177.4 ms, beyond the pairs' spread" in said
    assert r.tables[COMM]["Baseline DDP [2 proc]"]["Share of step (%)"] == "~0 (in noise)"


# --------------------------------------------------------------------------- modeled compute (issue 31's field)
COMPUTE_MODEL = {"kind": "flops", "label": "modeled compute: flops at 20 TFLOP/s", "spec": "flops:20",
                 "modeled_batch": 64, "modeled_image_size": 224, "proxy_batch": 2, "proxy_image_size": 32,
                 "modeled_compute_per_step": 0.051, "overrun_per_step": 0.0}


def modeled(name, factor=10.0):
    """A real fixture as a modeled-compute run would write it: compute_model set, modeled images counted."""
    data = fixture(name)
    data["compute_model"] = dict(COMPUTE_MODEL)
    data["summary"]["avg_train_throughput"] *= factor
    for e in data["epochs"]:
        e["train_throughput"] *= factor
    return data


def test_a_modeled_compute_run_is_named_and_never_compared_as_real(tmp_path):
    extra = {"results_baseline_ddp_modeled.json": modeled(DEFAULTS[0]), "results_ps_modeled.json": modeled(DEFAULTS[2]),
             "results_all_reduce_modeled.json": modeled(DEFAULTS[1]),
             "results_ps_p2p.json": {**fixture("results_ps_p2p.json"), "compute_model": None}}  # null: real compute
    other = extra["results_all_reduce_modeled.json"]["compute_model"]  # another model, told apart by its label
    del other["spec"]
    other["label"] = "flops at 40 TFLOP/s"
    r = analyze(tmp_path, setup_dir(tmp_path, DEFAULTS, extra))
    assert r.rc == 0 and r.stderr == ""
    perf = r.tables[PERF]
    trade = {row["Method"]: row for row in analysis.tables.tradeoff_table(r.analysis.experiments).rows}
    labels = list(perf)
    ddp_m, ar_m, ps_m = model_labels = [x for x in labels if "modeled compute" in x]
    # Each label names its compute model (two here); the same seed of a real and a modeled DDP is two experiments.
    assert model_labels == ["Baseline DDP (modeled compute flops:20) [2 proc]",
                            "Manual All-Reduce (overlap, modeled compute flops at 40 TFLOP/s) [2 proc]",
                            "Parameter Server (collective, modeled compute flops:20) [3 proc]"], labels
    real = [x for x in labels if x not in model_labels]
    assert real == ["Baseline DDP [2 proc]", "Manual All-Reduce (overlap) [2 proc]",
                    "Parameter Server (collective) [3 proc]", "Parameter Server (p2p) [3 proc]"]
    for label in model_labels:
        assert perf[label]["Best accuracy (%)"] == trade[label]["Final val accuracy (%)"] == "n/a (modeled compute)"
        assert trade[label]["Final train loss"] == "n/a (modeled compute)"
    for label in real:
        assert re.fullmatch(r"\d+\.\d\d", perf[label]["Best accuracy (%)"]), label
    # Speedups only within one compute model.
    assert perf[ddp_m]["Relative speedup"] == perf[real[0]]["Relative speedup"] == "1.00x (baseline)"
    m = [fixture(n)["summary"]["avg_train_throughput"] * 10 for n in (DEFAULTS[0], DEFAULTS[2])]
    assert perf[ps_m]["Relative speedup"] == f"{m[1] / m[0]:.2f}x (vs DDP on 2)"  # the modeled DDP's, not the real
    assert perf[ar_m]["Relative speedup"] == "n/a (no DDP of its compute model)"
    # No sentence of the analysis sets a modeled run against a real one; one says that they are mixed.
    for line in r.report.split("Analysis (computed")[1].split("\nRun context")[0].splitlines():
        shown = [x for x in labels if x in line]
        if any(x in model_labels for x in shown):
            assert not [x for x in shown if x in real and not any(x in m for m in model_labels if m in line)], line
    assert "never against a real run" in r.line("Modeled and real compute are mixed here (flops at 40 TFLOP/s; modeled compute: flops at 20")
    assert "Throughput at 2 processes: Manual All-Reduce (overlap) [2 proc] has the highest" in r.report
    assert f"Throughput at 2 processes, modeled compute flops:20" not in r.report  # one run there: nothing to rank
    assert "Loss and accuracy not compared for " + ", ".join(model_labels) in r.report
    assert "warning: runs differ in compute" in r.report and "flops at 20 TFLOP/s" in r.report
    # The plots leave the modeled runs out of accuracy and loss, and say why.
    assert r.plots["accuracy_curves.png"]["left_out"] == model_labels
    assert "modeled compute" in r.plots["accuracy_curves.png"]["note"]
    assert set(r.plots["loss_curves.png"]["curves"]) == set(real)
    # The answer's rows are the real runs, and it stays within 120 columns.
    picks = analysis.answer.guide_rows(r.analysis.experiments)
    assert [x.label for x in picks.values()] == real[:3]
    assert max(len(line) for line in r.raw.splitlines()) <= 120


def test_an_all_modeled_folder_names_it_on_the_first_page(tmp_path):
    r = analyze(tmp_path, setup_dir(tmp_path, (), {n: modeled(n) for n in DEFAULTS}))
    assert r.rc == 0
    page = first_page(r.raw)
    for method in ("Baseline DDP", "Manual All-Reduce", "Parameter Server"):
        assert re.search(rf"^{method} \(modeled compute\) .*n/a \(modeled compute\)", page, re.M), method
        assert re.search(rf"^{method} \(modeled compute\) ", page.split("second table")[1], re.M), method
    said = analysis.answer.sentences(r.analysis.experiments)
    for sentences in said.values():  # every method a sentence names is named with its compute
        for s in sentences:
            for hit in re.finditer(r"\b(DDP|the all-reduce|the PS)\b", s, re.I):
                assert re.match(r"( on \d+)? \(modeled compute\)", s[hit.end():]), (s, hit.group())
    convergence = " ".join(said["Convergence"])
    assert "modeled compute trains a proxy, so its loss and accuracy mean nothing" in convergence
    assert "loss curve" not in convergence and "Best val accuracy" in convergence  # shown as n/a, not compared
    assert "n/a (modeled compute)" in convergence and "points" not in convergence
    assert "DDP (modeled compute) trains" in " ".join(said["Throughput"])
    assert r.plots["loss_curves.png"]["curves"] == {} and "modeled compute" in r.plots["loss_curves.png"]["note"]
    check_plots(r.out)


def test_the_docs_page_holds_every_tables_caption_and_definitions():
    """The text report shows each table's one-line caption and links docs/reading_the_report.md once for the rest:
    the page must hold every caption and note as the analysis writes them (regenerate its list when they change)."""
    doc = (REPO / "docs" / "reading_the_report.md").read_text()
    xs = runs.load_folder(HAND / "hier")[0] + runs.load_folder(HAND / "loopback")[0] + runs.load_folder(FIXTURES)[0]
    built = analysis.tables.build_tables(xs)
    assert {t.title for t in built} == set(analysis.tables.CAPTIONS)
    for t in built:
        assert f"### {t.title}\n\n{t.caption}\n\n{t.note}\n" in doc, t.title
        assert t.caption and len(t.title) + len(t.caption) + 2 <= 120 or len(t.caption) <= 120, t.title


# --------------------------------------------------------------------------- the yardstick's standard error (issue 35)
@pytest.mark.parametrize("pairs,beyond", [(4, True), (2, False)])
def test_the_overhead_verdict_uses_the_pairs_standard_error_where_recorded(tmp_path, pairs, beyond):
    """DDP 68 ms and the PS 584 ms are within their min-max spread (611 ms) over 2 pairs; with 4 pairs and each
    median's standard error 50 ms recorded, 516 ms apart is beyond 2 x hypot(50, 50) = 141 ms."""
    files = {}
    for name in (DEFAULTS[0], DEFAULTS[2]):
        data = fixture(name)
        data["comm_overhead"].update(pairs=pairs, overhead_se=0.05, overhead_stdev=0.05 * pairs ** 0.5 / 1.2533)
        files[name] = data
    xs, _ = runs.load_folder(setup_dir(tmp_path, (), files))
    v = analysis.verdicts.compare_overhead(xs[1], xs[0])
    assert v.beyond is beyond
    if beyond:
        assert v.noise == pytest.approx(2 * math.hypot(0.05, 0.05)) and "2 standard errors" in v.measure
    else:
        assert "the pairs' spread" in v.measure
