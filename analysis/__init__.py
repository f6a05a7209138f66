"""The analysis of the kit's (and the guide's) results files, one module per concern:

    runs      loading: which JSON files are results (kit or guide shape), Run and Experiment, grouping by seed
    stats     Estimate (mean, spread over seeds), Verdict and compare(a, b, noise): the one noise rule
    verdicts  the judgements the tables and the report share (throughput, overhead, hidden share, accuracy)
    curves    loss curves, smoothing, the seed-to-seed noise floor
    time_to_target
              time to a target accuracy per run (its record, or its epochs), the targets, mean and spread over
              seeds, the verdict against the seeds' spread
    links     bytes through the busiest link against the link rate, the bounds the methods cannot beat, a flat
              ring's and the two-level all-reduce's bytes, the physical limit of a step, the cost against nodes
    ranks     each trainer's own compute per step and the straggler the run named (rank_compute)
    recovery  the restarts a run survived and what its checkpoints cost
    tables    Table (title, columns, rows of named cells, note) and its text and markdown renderers
    plots     the plots; each returns the numbers it drew
    answer    the report's first page: the guide's two Section 4.2 tables, which method reached the target accuracy
              first, and the guide's four analysis points
    report    the report's prose, from verdicts: the answer, then the Details, grouped, within 120 columns
    cli       main(): what analyze_results.py runs

Nothing here imports torch: the mode lists come from modes.py.
"""
from .cli import Analysis, analyze, main
from .runs import Experiment, Run, Skipped, load_folder, load_run
from .stats import Estimate, Verdict, compare

__all__ = ["Analysis", "analyze", "main", "Experiment", "Run", "Skipped", "load_folder", "load_run", "Estimate",
           "Verdict", "compare"]
