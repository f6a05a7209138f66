"""--mode async: one full-duplex server applies each worker's gradient as it arrives (Async)."""
import queue
import threading
import time

import torch
import torch.distributed as dist

import common
import measure
from sync.buckets import record_event
from sync.ps import SERVER, Collective, ServerStats, Transport


PULL, PUSH = 0, 1


class _AsyncServer:
    """Async's server: its own thread receives and applies the pushes (serve), a reader thread takes the tickets
    (_read_tickets) and a sender thread answers the pulls (_send_pulls), under Async's rules."""

    @torch.no_grad()
    def serve(self, pushes, optimizer, lr_of, after_push=None):
        """Server: answers tickets until `pushes` gradients have been applied (`after_push(n)` after the n-th, in
        this thread); returns their staleness. The tickets after the last push are left to the next call. Its
        phases (on the clock it holds): the wait for a push, its receive, its update."""
        inbox, outbox, staleness = queue.Queue(), queue.Queue(), []
        self.sent_seconds = 0.0
        threads = [threading.Thread(target=self._read_tickets, args=(pushes, inbox, outbox), daemon=True),
                   threading.Thread(target=self._send_pulls, args=(outbox, inbox), daemon=True)]
        for thread in threads:
            thread.start()
        while len(staleness) < pushes:
            worker, version = self._next_push(inbox)
            self._receive(worker)
            staleness.append(self._apply_push(worker, version, optimizer, lr_of(len(staleness))))
            if after_push:
                after_push(len(staleness))
        for thread in threads:
            thread.join()
        return staleness

    @measure.phase("wait")
    def _next_push(self, inbox):
        """The next push's (worker, version), in ticket order (a reader's or sender's error: raised here)."""
        item = inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    @measure.phase("receive")
    def _receive(self, worker):
        """A worker's gradients (and buffers) received whole, then its receipt sent."""
        for bucket in self.layout.push:
            dist.recv(bucket.flat, src=worker, group=self.pushes)
        with self.changed:
            self.received += 1
        dist.send(torch.zeros(1), dst=worker, group=self.receipts)

    @measure.phase("update")
    def _apply_push(self, worker, version, optimizer, lr):
        """The push received from `worker` (computed on `version`) applied at `lr`, under the state's lock: the
        buffers' mean of each worker's latest, one optimizer step. Returns its staleness."""
        with self.changed:
            if self.packed is not None:
                torch.cuda.current_stream().wait_event(self.packed)
            stale = self.version - version
            self.latest[worker] = [b.flat.clone() for b in self.layout.buffer_buckets]
            for i, bucket in enumerate(self.layout.buffer_buckets):
                bucket.flat.copy_(sum(latest[i] for latest in self.latest.values()) / len(self.latest))
                bucket.unpack()
            common.set_lr(optimizer, lr / self.num_workers)
            optimizer.step()  # the gradients are views of what was just received
            self.version += 1
            self.applied += 1
            self.updated = record_event(self.device)
            self.changed.notify_all()
        return stale

    def _read_tickets(self, pushes, inbox, outbox):
        """The server's reader: pushes to the server's thread in arrival order; pulls to the sender, each with
        the number of pushes received by then (its snapshot includes them)."""
        ticket, seen = torch.zeros(2, dtype=torch.int64), 0
        try:
            while seen < pushes:
                worker = dist.recv(ticket, group=self.tickets)
                if int(ticket[0]) == PULL:
                    with self.changed:
                        outbox.put((worker, self.received))
                else:
                    inbox.put((worker, int(ticket[1])))
                    seen += 1
            outbox.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again by the server's thread
            inbox.put(e)
            outbox.put(None)

    @torch.no_grad()
    def _send_pulls(self, outbox, inbox):
        """The server's sender: a snapshot of the state for each pull, sent while pushes keep arriving."""
        try:
            with common.comm_stream(self.device):
                while (item := outbox.get()) is not None:
                    worker, needed = item
                    start = time.perf_counter()
                    with self.changed:
                        self.changed.wait_for(lambda: self.applied >= needed)
                        if self.updated is not None:
                            torch.cuda.current_stream().wait_event(self.updated)
                        version = self.version
                        for bucket in self.layout.pull:
                            bucket.pack()
                        self.packed = record_event(self.device)  # the next update waits until this copy is taken
                    dist.send(torch.tensor([version]), dst=worker, group=self.replies)
                    for bucket in self.layout.pull:
                        dist.send(bucket.flat, dst=worker, group=self.pulls)
                    self.sent_seconds += time.perf_counter() - start
        except BaseException as e:  # noqa: BLE001 - raised again by the server's thread
            inbox.put(e)


class Async(_AsyncServer, Transport):
    """--mode async: each worker asks for the newest state (a PULL ticket) before computing and sends its
    gradients (a PUSH ticket, with the version it computed on) after; the server applies every push at once, in
    the order the tickets arrive, and is full duplex: a reader thread takes the tickets (any-source, on a gloo
    group: NCCL has none), a sender thread answers the pulls while the server's own thread receives and applies
    the pushes, each direction on a process group of its own (the state out on `pulls`, the gradients in on
    `pushes`, the small replies on gloo groups of their own), so one worker's pull never waits behind another's
    push through the server's link. The rules that keep it exact:
      - every push is received and applied once, one at a time, in ticket order, by the server's thread;
      - a pull is a snapshot of the state and its version taken under the same lock as the updates (never half
        updated), that includes every push the server had wholly received when the pull's ticket arrived (it
        waits for their update, not for a transfer), and a worker's push returns only once the server has it
        (a one-element receipt), so a pull that comes after a push ended sees it: serialized workers are never
        stale, and staleness (updates between a worker's pull and its push) counts as before.
    The epoch's final pull is a collective one."""

    def __init__(self, layout, rank, num_workers):
        super().__init__(layout, rank, range(1, num_workers + 1))
        self.num_workers = num_workers
        self.tickets, self.replies, self.receipts = (dist.new_group(backend="gloo") for _ in range(3))
        self.pulls, self.pushes = dist.new_group(), dist.new_group()  # every rank must call new_group
        self.final = Collective(layout, rank, self.trainers)
        self.version = 0
        self.latest = {}  # server: each worker's latest buffers, whose mean it serves
        self.changed = threading.Condition()  # server: guards the state, the version and the counts below
        self.received = self.applied = 0
        self.device = layout.params[0].device
        self.updated = self.packed = None  # server, on a GPU: the last update's and the last snapshot's events

    def state_dict(self):
        return {"version": self.version, "latest": {str(w): b for w, b in self.latest.items()}}

    def load_state_dict(self, state):
        self.version, self.latest = state["version"], {int(w): b for w, b in state["latest"].items()}

    def _ticket(self, what):
        """A worker: tells the server what it asks for next (PULL or PUSH), with the version it holds."""
        dist.send(torch.tensor([what, self.version]), dst=SERVER, group=self.tickets)

    @torch.no_grad()
    def pull(self):  # worker
        self._ticket(PULL)
        version = torch.zeros(1, dtype=torch.int64)
        dist.recv(version, src=SERVER, group=self.replies)
        self.version = int(version)
        for bucket in self.layout.pull:
            dist.recv(bucket.flat, src=SERVER, group=self.pulls)
            bucket.unpack()

    @torch.no_grad()
    def push(self):  # worker
        self._ticket(PUSH)
        for bucket in self.layout.push:
            bucket.pack_buffers()
            dist.send(bucket.flat, dst=SERVER, group=self.pushes)
        dist.recv(torch.zeros(1), src=SERVER, group=self.receipts)  # the server has it all

    def final_pull(self):
        self.final.fresh = False
        self.final.final_pull()

    # the server, its own: ps_train.serve_epoch runs these, on the clock it hands over as `clock`
    own_server = asynchronous = True  # the epoch's pushes served as they come, in one call (serve_epoch)

    def serve_step(self, optimizer, lr):
        self.serve(self.num_workers, optimizer, lambda i: lr)

    def serve_epoch(self, optimizer, lr_at, steps, start, after_step=None):
        """A step's worth of gradients (one per worker) between checkpoints, so that a checkpoint after step k
        finds every worker's k-th gradient applied: each worker stops there, after its k-th push, and the server
        writes its part once it has applied k x workers of them. `lr_at(step)`: at a fraction of a step too."""
        w = self.num_workers

        def at(applied):
            if after_step and applied % w == 0 and start + applied // w < steps:
                after_step(start + applied // w)

        self.stale = self.serve(w * (steps - start), optimizer, lambda i: lr_at((start * w + i) / w), at)

    def end_serving(self):
        self.final_pull()  # the epoch's model, to everyone

    def server_figures(self, sums, timed, lrs):
        """Per step served: sending pulls, waiting for a push, receiving and applying it; the staleness."""
        return ServerStats(self.sent_seconds / timed, sums.get("wait", 0.0) / timed,
                           (sums.get("update", 0.0) + sums.get("receive", 0.0)) / timed,
                           sum(self.stale) / len(self.stale), max(self.stale), lrs)
