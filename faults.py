"""What the kit does when the world misbehaves (docs/faults.md): a stop signal (SIGTERM from a scheduler, SIGINT
from Ctrl-C) ends every rank at one agreed step, with a checkpoint there when checkpoints are on; and a hang names
the rank it waits for.

How the ranks agree without a collective in the hot loop: the first rank that handles the signal proposes a stop
`MARGIN` global steps ahead through the process group's store (compare_set: the first proposal wins); every rank
polls that one key after each step (one store round trip, ~0.1 ms). The lock-step methods are never more than
one step apart, so every rank is still before the agreed step when it learns it.

Where each rank is: before each step every rank writes the global step it enters to the store (`kit/where/<rank>`,
one more round trip). When an exchange times out, each surviving rank reads them: the ranks still before its own
step had not arrived, and it says so in one line, with the exchange it was in (its method, step and phase, and
gloo's own words for the operation), and in the results JSON.

Rehearsal: KIT_STOP_RANK_AT=RANK:STEP makes rank RANK stop itself (SIGSTOP) just before global step STEP, a hung
process as a test or a user would make one.
"""
import os
import re
import signal
import sys
import threading
import time

import torch.distributed as dist

import common


STOP_KEY = "kit/stop_at_step"
WHERE_KEY = "kit/where/"  # + rank: the global step that rank is in
HANG_KEY = "kit/hang/"  # + rank: that rank has read the others' steps after its timeout
MARGIN = 2  # steps between the proposal and the stop: ranks in lock-step are at most one step apart
REPEAT_S = 2.0  # a second signal sooner than this is the same one forwarded (torchrun passes Ctrl-C on)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _store():
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None


class StopOnSignal:
    """Installed for the training loop: the first SIGTERM/SIGINT asks for a stop at an agreed step; one more, later
    than REPEAT_S, stops this rank at once (SIGINT: KeyboardInterrupt, as before; SIGTERM: exit 143)."""

    def __init__(self, rank=0, step=0):
        self.signum, self.first_at, self.at, self.rank, self.step = None, None, None, rank, step
        self.store = _store()
        rehearse = os.environ.get("KIT_STOP_RANK_AT", "")
        self.stop_self_at = int(rehearse.split(":")[1]) if rehearse.split(":")[0] == str(rank) else None
        self.entering(step + 1)
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
            return
        if time.monotonic() - self.first_at < REPEAT_S:
            return
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def due(self, step):
        """True when this rank must stop now, after global step `step` (every rank calls it after every step)."""
        self.entering(step + 1)
        if self.at is None:
            if self.signum is not None:
                mine = f"{step + MARGIN} {self.signum}"
                agreed = mine if self.store is None else self.store.compare_set(STOP_KEY, "", mine).decode()
                self.at, self.signum = map(int, agreed.split())
            elif self.store is not None and self.store.check([STOP_KEY]):  # another rank's signal
                self.at, self.signum = map(int, self.store.get(STOP_KEY).decode().split())
        return self.at is not None and step >= self.at

    def stopped(self, step, steps, saved, results, writer):
        """At the agreed step `step` (every rank; `steps` an epoch): the results say where the run stopped (rank
        `writer`); returns the common.Stopped to raise, its line saying how to continue (`saved`: the checkpoint
        written after `step`, or None)."""
        epoch, done = (step - 1) // steps + 1, (step - 1) % steps + 1
        if self.rank == writer:
            results.update(stopped={"signal": self.name, "after_step": step,
                                    "checkpoint": str(saved) if saved else None})
        return common.Stopped(self.signum, step, (
            f"stopped by {self.name} after step {step} (epoch {epoch}, step {done} of {steps}): "
            + (f"checkpoint {saved}, rerun with --resume to continue; " if saved else "no checkpoint (--resume or "
               "--checkpoint-every writes them); ")
            + f"the {len(results.data['epochs'])} finished epoch(s) are kept in {results.path}"))

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def entering(self, step):
        """This rank is about to run global step `step` (1-based): said to the store, for a hang's report."""
        self.step = step
        if step == self.stop_self_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.store is not None:
            self.store.set(f"{WHERE_KEY}{self.rank}", str(step))


EXCHANGE = {"baseline_ddp": "DDP's bucket all-reduce in backward", "all_reduce": "the gradient all-reduce",
            "ps": "a push or pull with the server"}  # what a step exchanges, per method (its phases narrow it)


def hang_report(ctx, kind, watch, error):
    """After an exchange timed out or a peer vanished: {rank, step, phase, operation, not_arrived, steps} and its one
    line, read from the store (5 s at most: a stopped rank 0 also holds the store, and that is said)."""
    from measure import StepClock
    clock = StepClock.current
    phase = clock.steps[-1][-1][0] if clock and clock.steps and clock.steps[-1] else None
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    operation = re.sub(r"^\[[^\]]*\]\s*", "", text)[:160]
    steps, store = {}, _store()
    if store is not None:  # in a thread of its own: a client blocked on a stopped store host must not hold us up
        def read():
            for r in range(ctx.world_size):
                key = f"{WHERE_KEY}{r}"
                steps[r] = int(store.get(key)) if store.check([key]) else 0
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(5)
        steps = dict(steps)
    unread = [r for r in range(ctx.world_size) if r not in steps]
    behind = sorted(r for r, s in steps.items() if r != ctx.rank and s < watch.step)
    if store is not None and not unread:
        threading.Thread(target=_quietly_set, args=(store, f"{HANG_KEY}{ctx.rank}"), daemon=True).start()
    report = {"rank": ctx.rank, "method": kind, "step": watch.step, "phase_after": phase, "operation": operation,
              "not_arrived": behind, "steps": {str(r): s for r, s in steps.items()}}
    where = f"{kind} step {watch.step} ({EXCHANGE.get(kind, 'an exchange')}" + (
        f", after its {phase!r} phase" if phase else "") + ")"
    if behind:
        who = ", ".join(f"rank {r} (still at step {steps[r]})" for r in behind)
        said = f"had not arrived: {who}"
    elif unread:
        said = "the store (hosted by rank 0) did not answer: rank 0, or this rank's link to it, is stopped or gone"
    else:
        said = "every rank had reached this step: the one that failed is in the exchange itself"
    line = f"hang: rank {ctx.rank} timed out in {where}: {operation}; {said}"
    return report, line


def _quietly_set(store, key):
    with _quietly():
        store.set(key, "reported")


class _quietly:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


def linger(ctx, report, seconds, stop=None):
    """Rank 0 hosts the store (without torchrun's agent): after its own report it waits up to `seconds` for every
    rank that had arrived to have read the store too, so that each names the missing rank. A stop signal ends
    the wait (`stop`: the StopOnSignal): torchrun, having seen a rank die, is tearing the group down, and a rank
    that was killed never reads (a wait for it cost every --max-restarts recovery torchrun's 30 s grace period)."""
    store = _store()
    others = [int(r) for r, s in report["steps"].items() if int(r) != ctx.rank and s >= report["step"]]
    if ctx.rank != 0 or store is None or not others:
        return
    keys, deadline = [f"{HANG_KEY}{r}" for r in others], time.monotonic() + seconds
    with _quietly():
        while time.monotonic() < deadline and not (stop and stop.signum) and not store.check(keys):
            time.sleep(0.05)  # short sleeps: the signal's handler runs between them


def report_hang(ctx, kind, stop, error, results, writer, timeout):
    """A peer failed or hung: this rank's line on stderr and the report in the results (the writer); rank 0, which
    hosts the store, waits for the others to have read it (linger, up to the --timeout `timeout` in minutes). The
    caller raises the error again."""
    report, line = hang_report(ctx, kind, stop, error)
    print(line, file=sys.stderr, flush=True)
    if ctx.rank == writer:
        results.update(hang=report)
    linger(ctx, report, 60 * timeout + 5, stop)
