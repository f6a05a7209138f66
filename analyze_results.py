"""Compares the methods' results: terminal tables, plots and a written report, every claim from a number.

    python analyze_results.py [--results-dir ./] [--out-dir ./]

Reads every *.json in --results-dir and keeps those whose content is a results file: the kit's
(docs/results_schema.md) or the guide's own shape (GUIDE.md "Result files (JSON)"); every other JSON file is named
with the reason, one line each. Writes <out-dir>/plots/*.png, performance_report.txt and report_tables.md. Runs
that differ only in their seed are one experiment: its numbers are the mean over seeds (with the spread), and the
seed-to-seed spread is the noise floor the report judges differences against. A run that did not finish is kept
but marked "(incomplete)" everywhere. The work is done by the analysis/ package (one module per concern).
"""
import sys

from analysis import Experiment, main, runs  # noqa: F401  (Experiment: tests/test_cluster.py)
from analysis.links import link_figures


# --------------------------------------------------------------------------- the older names
# tests/test_cluster.py still calls load_run(path).overhead() and link_bound(Experiment([run])); new code uses
# analysis.load_run(path).yardstick.overhead and analysis.links.link_figures(experiment).
class _Run(runs.Run):
    def overhead(self):
        """The yardstick's median overhead (seconds), or None."""
        return self.yardstick.overhead if self.yardstick else None


def load_run(path):
    """analysis.load_run, with the older overhead() call."""
    run = runs.load_run(path)
    return _Run(run.data, run.path, run.kind, run.told_by)


def link_bound(x):
    """The link figures as the older API gave them, for tests/test_cluster.py: ((sent, received) bytes per step
    on the busiest link, their seconds at the link rate, the least bytes the method moves per direction or None,
    how that was derived); None without a declared link."""
    f = link_figures(x)
    return None if f is None else ((f.sent, f.received), f.link_time, f.bound_bytes, f.bound_how)


if __name__ == "__main__":
    sys.exit(main(description=__doc__.splitlines()[0]))
