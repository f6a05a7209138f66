"""The command line: read the folder, print the guide's answer and the tables, write the plots,
performance_report.txt and report_tables.md."""
import argparse
import dataclasses
import sys
from pathlib import Path

from .plots import make_plots
from .report import answer_text, build_report, tables_text, wrap
from .runs import load_folder
from .tables import build_tables, render_markdown


@dataclasses.dataclass
class Analysis:
    """What one analysis wrote, for callers that want the numbers: the experiments, the skipped files, the tables,
    {plot file: what it drew} and the report's text."""
    experiments: list
    skipped: list
    tables: list
    plots: dict
    report: str


def analyze(results_dir, out_dir):
    """Analyses the results folder into out_dir; returns the Analysis, or None (having said why) when the folder
    holds no usable results file. Skipped files are named one a line on stderr."""
    experiments, skipped = load_folder(results_dir)
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    if not experiments:
        found = f" (skipped: {'; '.join(map(str, skipped))})" if skipped else " (no *.json file there)"
        print(f"error: no usable results file in {Path(results_dir).resolve()}{found} "
              "(run the experiments first, e.g. bash run_all.sh)", file=sys.stderr)
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(experiments)
    print(answer_text(experiments) + "\n\n" + "=" * 24 + "\nDetails (the full analysis: performance_report.txt)\n\n"
          + tables_text(tables))
    plots = make_plots(experiments, out / "plots")
    report = build_report(experiments, skipped, tables, plots)
    (out / "performance_report.txt").write_text(report)
    (out / "report_tables.md").write_text("\n\n".join(render_markdown(t) for t in tables) + "\n")
    print("\n" + wrap(f"wrote {out / 'performance_report.txt'}, {out / 'report_tables.md'} and {len(plots)} plots "
                      f"in {out / 'plots'}"))
    return Analysis(experiments, skipped, tables, plots, report)


def main(argv=None, description="Compares the methods' results: tables, plots and a report."):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results-dir", default="./", help="the folder holding the results files (every *.json there "
                                                       "is looked at)")
    p.add_argument("--out-dir", default="./", help="where performance_report.txt, report_tables.md and plots/ go")
    args = p.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        print(f"error: --results-dir {args.results_dir} does not exist (pass the folder with the results files)",
              file=sys.stderr)
        return 1
    return 0 if analyze(args.results_dir, args.out_dir) else 1
