"""Loss curves: a run's per-step losses on an epoch axis, smoothed, on a grid shared by several experiments, and
the seed-to-seed spread that is their noise floor."""
import numpy as np


def loss_curve(run):
    """(epoch position, per-step loss) arrays of one run (empty when it has no per-step losses)."""
    xs, ys = run.losses or ([], [])
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def smooth(y, window):
    """Centred moving average that keeps the length (narrower windows at the ends)."""
    if window <= 1 or len(y) < 3:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.clip(i - window // 2, 0, len(y)), np.clip(i + window - window // 2, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def smoothed(run):
    """The loss curve, averaged over about a quarter of an epoch."""
    x, y = loss_curve(run)
    steps_per_epoch = len(y) / max(1, len(run.epochs))
    return x, smooth(y, max(1, round(steps_per_epoch / 4)))


def common_grid(*experiments):
    """200 points where every run of the experiments has a curve, or None."""
    ends = [smoothed(r)[0] for x in experiments for r in x.runs]
    if any(len(e) < 2 for e in ends):
        return None
    lo, hi = max(e[0] for e in ends), min(e[-1] for e in ends)
    return np.linspace(lo, hi, 200) if hi > lo else None


def curves_on(grid, x):
    """Each seed's smoothed loss curve of experiment x on the grid."""
    return np.array([np.interp(grid, *smoothed(r)) for r in x.runs])


def mean_gap(grid, x, y):
    """Mean |difference| between the two experiments' (seed-mean) smoothed curves."""
    return float(np.mean(np.abs(curves_on(grid, x).mean(0) - curves_on(grid, y).mean(0))))


def seed_floor(x, grid):
    """The noise floor: mean |difference| between two seeds' smoothed loss curves (None with one seed)."""
    if len(x.runs) < 2:
        return None
    c = curves_on(grid, x)
    return float(np.mean([np.mean(np.abs(c[i] - c[j])) for i in range(len(c)) for j in range(i + 1, len(c))]))


def steps_matching(a, b, rel=1e-3):
    """(steps from the start whose raw losses agree within rel, steps compared) of two runs."""
    _, ya = loss_curve(a)
    _, yb = loss_curve(b)
    n = min(len(ya), len(yb))
    off = np.abs(ya[:n] - yb[:n]) > rel * np.abs(yb[:n])
    return (int(np.argmax(off)) if off.any() else n), n
