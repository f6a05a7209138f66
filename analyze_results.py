"""Compares the methods' results: terminal tables, plots and a written report, every claim from a number.

    python analyze_results.py [--results-dir ./] [--out-dir ./]

Reads every *.json in --results-dir and keeps those whose content is a results file: the kit's
(docs/results_schema.md) or the guide's own shape (GUIDE.md "Result files (JSON)"); every other JSON file is named
with the reason, one line each. Writes <out-dir>/plots/*.png, performance_report.txt and report_tables.md. Runs
that differ only in their seed are one experiment: its numbers are the mean over seeds (with the spread), and the
seed-to-seed spread is the noise floor the report judges differences against. A run that did not finish is kept
but marked "(incomplete)" everywhere; a run with modeled compute (`compute_model`) is named so everywhere and
compared only with runs of its compute model. The report (and the terminal) opens with the guide's answer: its
Section 4.2 tables and one paragraph per analysis point; docs/reading_the_report.md explains the rest. The work is
done by the analysis/ package (one module per concern).
"""
import sys

from analysis import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.splitlines()[0]))
