"""What the kit does when the world misbehaves (docs/faults.md): a stop signal (SIGTERM from a scheduler, SIGINT
from Ctrl-C) ends every rank at one agreed step, with a checkpoint there when checkpoints are on.

How the ranks agree without a collective in the hot loop: the first rank that handles the signal proposes a stop
`MARGIN` global steps ahead through the process group's store (compare_set: the first proposal wins); every rank
polls that one key after each step (one store round trip, ~0.1 ms). The lock-step methods are never more than
one step apart, so every rank is still before the agreed step when it learns it.
"""
import signal
import time

import torch.distributed as dist


STOP_KEY = "kit/stop_at_step"
MARGIN = 2  # steps between the proposal and the stop: ranks in lock-step are at most one step apart
REPEAT_S = 2.0  # a second signal sooner than this is the same one forwarded (torchrun passes Ctrl-C on)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _store():
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None


class StopOnSignal:
    """Installed for the training loop: the first SIGTERM/SIGINT asks for a stop at an agreed step; one more, later
    than REPEAT_S, stops this rank at once (SIGINT: KeyboardInterrupt, as before; SIGTERM: exit 143)."""

    def __init__(self):
        self.signum, self.first_at, self.at = None, None, None
        self.store = _store()
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
        if self.at is None:
            if self.signum is not None:
                mine = f"{step + MARGIN} {self.signum}"
                agreed = mine if self.store is None else self.store.compare_set(STOP_KEY, "", mine).decode()
                self.at, self.signum = map(int, agreed.split())
            elif self.store is not None and self.store.check([STOP_KEY]):  # another rank's signal
                self.at, self.signum = map(int, self.store.get(STOP_KEY).decode().split())
        return self.at is not None and step >= self.at

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal"
