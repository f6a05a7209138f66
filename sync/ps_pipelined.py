"""--comm pipelined: BytePS's push-sum-pull per partition (Partitions), each updated by its owner as soon as its
pushes are in and pulled in the order the next forward needs it (Pipelined)."""
import queue
import threading
import time

import torch
import torch.distributed as dist

import measure
from sync.buckets import record_event, run_jobs, sgd_step
from sync.ps import SERVER, Bucket, Layout, ServerStats, Transport


class Partitions(Layout):
    """--comm pipelined: the parameters, in the order backward produces their gradients, cut into partitions of
    about `bucket_mb` (a partition under half of it takes the next tensor whatever its size, so a small tensor
    before a large one does not travel alone), each owned whole by one of `owners`, dealt out largest first to
    the least loaded in bytes (the shards within a percent of each other on ResNet-50 at 4 MiB, which sets the
    busiest link's bytes). A module's buffers go with its first parameter's partition (a module without
    parameters: with the module before it). push[i] holds partition i's gradients (views) then those buffers;
    pull[i] the same parameters' values then the same buffers: one message each way carries a partition."""

    def __init__(self, model, bucket_mb, owners):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        self.scale = torch.ones((), device=self.params[0].device)  # fp16 is refused: always 1
        cap, parts, size = bucket_mb * 2 ** 20, [], 0
        for p in self.params[::-1]:
            if not parts or (size + 4 * p.numel() > cap and size >= cap / 2):
                parts.append([])
                size = 0
            parts[-1].append(p)
            size += 4 * p.numel()
        sizes = [sum(p.numel() for p in part) for part in parts]
        load, part_owner = {r: 0 for r in owners}, [None] * len(parts)
        for i in sorted(range(len(parts)), key=lambda i: (-sizes[i], i)):
            part_owner[i] = min(owners, key=lambda r: (load[r], r))
            load[part_owner[i]] += sizes[i]
        part_of = {id(p): i for i, part in enumerate(parts) for p in part}
        buffers, current = [[] for _ in parts], len(parts) - 1  # forward meets the last partition first
        for m in model.modules():
            first = next((p for p in m.parameters(recurse=False) if id(p) in part_of), None)
            current = part_of[id(first)] if first is not None else current
            buffers[current] += list(m.buffers(recurse=False))
        self.owner = {id(t): part_owner[i] for i, part in enumerate(parts) for t in (*part, *buffers[i])}
        self.owner[id(self.scale)] = SERVER
        self.grad_buckets = [Bucket([*part, *buffers[i]], part_owner[i], len(part)) for i, part in enumerate(parts)]
        self.pull = [Bucket([*part, *buffers[i]], part_owner[i], len(part)) for i, part in enumerate(parts)]
        self.buffer_buckets, self.push = [], self.grad_buckets
        self._grads_into_push_buckets()


class _PushPullJob:
    """One step's pipelined exchange on this rank: the partitions its backward has filled (and, on a GPU, the event
    after each); on an owner, each own partition's receives once posted and its update once made (True, or the
    event after it on a GPU); each partition's pull once posted (a trainer's receive, or None on its owner) with
    the event after its update; the partitions the training thread has taken in, whether every send has ended,
    the step's lr and the seconds its updates took."""

    def __init__(self, count, lr):
        self.lr, self.ready, self.events, self.filled = lr, [False] * count, [None] * count, [0] * count
        self.receives, self.updated, self.update_seconds = [None] * count, [None] * count, 0.0
        self.pulled, self.applied, self.finished = [None] * count, set(), False
        self.arrived = [False] * count  # ServerRanks --push-order priority: an owner's partition, all pushes in


class _Updater:
    """An owner's updater thread (Pipelined's): each partition it owns summed, averaged, updated and packed for its
    pull as soon as its pushes are in."""

    @torch.no_grad()
    def _update_owned(self, job):
        """Each partition this rank owns, in the order its pushes arrive, so that the pull phase finds them ready
        (only the last one waits)."""
        for p in self.owned:
            self._wait(lambda: job.receives[p] is not None)
            if self.trains:
                self._ready_here(job, p)
            for received in job.receives[p]:
                received.wait()
            self._update_and_pack(job, p)

    def _update_and_pack(self, job, p):
        """Partition `p` updated and packed for its pull (its seconds added to the job's), then said to be."""
        start = time.perf_counter()
        self._update(job, p)
        self.layout.pull[p].pack()
        job.update_seconds += time.perf_counter() - start
        event = record_event(self.device)  # the owner's next forward, and this partition's pull, wait for it
        self._publish(job.updated, p, True if event is None else event)

    def _update(self, job, p):
        """The owner: the sum of the pushes in the trainers' order (its own at its place: the sum p2p and the
        reference make, exactly), the mean, the update of that partition's parameters alone."""
        bucket, boxes = self.layout.push[p], iter(self.inbox[p])
        terms = [bucket.flat if trainer == self.rank else next(boxes) for trainer in self.trainers]
        total = terms[0]  # the first trainer's own buffer, or the received one (scratch until the next step)
        for term in terms[1:]:
            total.add_(term)
        if total is not bucket.flat:
            bucket.flat.copy_(total)
        bucket.flat.div_(len(self.trainers))
        bucket.unpack_buffers()
        sgd_step(self.optimizer, bucket.tensors[:bucket.grads], job.lr)


class _Exchange(_Updater, Transport):
    """The pipelined exchange's sequence, as the communication thread (or a server that does not train, in
    serve_step) runs it, with the owner's updater beside it, and the threads' shared state (a lock, the jobs).

    The order: every rank issues its sends and receives in one sequence fixed by the layout alone: the pushes in
    partition order (the order backward fills them), then the pulls in reverse (the order the next forward needs
    them), each owner's sends to its peers in rank order. A pair of ranks therefore issues its matching sends and
    receives in the same order (NCCL matches them by order and has no any-source receive), and every operation
    comes after every earlier one in the sequence on both sides, so none can wait for one that comes after it.
    Rank-local timing (which partition a rank's backward filled first) only delays when a rank issues its part,
    never the order: there is nothing to agree on while running. The sequence runs on a process group of its own
    (the training thread's collectives never interleave with it), waiting where it needs its own backward (before
    a push) or the update of a partition it owns (before that pull). On a GPU both threads issue on one stream of
    their own, ordered against the training stream by events only, never a host sync. A server's phases (on the
    clock the server's loop hands over): push, push_wait and serve; a trainer's thread is not timed."""

    def __init__(self, layout, rank, trainers, optimizer=None):
        super().__init__(layout, rank, trainers)
        self.optimizer, self.device = optimizer, layout.params[0].device
        self.group = dist.new_group()  # every rank must call new_group
        self.count = len(layout.push)
        self.inbox = {p: [torch.empty_like(b.flat) for _ in self.peers(rank)]
                      for p, b in enumerate(layout.push) if b.owner == rank}  # the others' pushes to my partitions
        self.changed, self.jobs, self.updates, self.error = threading.Condition(), queue.Queue(), queue.Queue(), None
        self.owned = [p for p, b in enumerate(layout.push) if b.owner == rank]
        self.update_seconds = []  # a server's, per step served
        # The threads' one CUDA stream: an update, then the pull of what it updated, in the order they are issued.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.owned:
            threading.Thread(target=run_jobs, args=(self, self.updates, self._update_owned, self.stream),
                             daemon=True).start()

    def _wait(self, condition):
        with self.changed:
            self.changed.wait_for(lambda: condition() or self.error is not None)
        if self.error is not None:
            raise self.error

    def _publish(self, slots, p, value):
        """`slots[p] = value`, said to the waiting threads."""
        with self.changed:
            slots[p] = value
            self.changed.notify_all()

    @torch.no_grad()
    def _exchange(self, job):
        """This rank's part of the sequence: the step's pushes, then its pulls. The updates of its own partitions
        run beside it, in the updater, as soon as their pushes are in."""
        sends = self._push_all(job)
        for p in reversed(range(self.count)):
            bucket, work, event = self.layout.pull[p], None, None
            if bucket.owner == self.rank:
                event = self._updated(job, p)
                sends += self._send_out(p, self.peers(self.rank))
            elif self.trains:
                work = dist.irecv(bucket.flat, bucket.owner, group=self.group, tag=self.count + p)
            self._publish(job.pulled, p, (work, event))
        self._sent(job, sends)

    @measure.phase("push")
    def _push_all(self, job):
        """The pushes in partition order: an owner posts its receives, a trainer sends each partition once its
        backward has filled it. Returns the sends."""
        sends, peers = [], self.peers(self.rank)
        if self.owned:
            self.updates.put(job)
        for p, bucket in enumerate(self.layout.push):
            if bucket.owner == self.rank:
                receives = [dist.irecv(box, peer, group=self.group, tag=p) for box, peer in zip(self.inbox[p], peers)]
                self._publish(job.receives, p, receives)
            elif self.trains:
                self._ready_here(job, p)
                sends.append(dist.isend(bucket.flat, bucket.owner, group=self.group, tag=p))
        return sends

    @measure.phase("push_wait")
    def _updated(self, job, p):
        """Waits for the update of own partition `p`; its event (None on a CPU)."""
        self._wait(lambda: job.updated[p] is not None)
        return None if job.updated[p] is True else job.updated[p]

    @measure.phase("serve")
    def _send_out(self, p, peers):
        """Own partition `p`, updated, sent to `peers` (the pull tags follow the push tags); its sends."""
        return [dist.isend(self.layout.pull[p].flat, peer, group=self.group, tag=self.count + p) for peer in peers]

    def _sent(self, job, sends):
        """The step's pushes (and a server's pulls) have left: the exchange is over, said to the waiting threads."""
        self._wait_sends(sends)
        with self.changed:
            job.finished = True
            self.changed.notify_all()

    @measure.phase("serve")
    def _wait_sends(self, sends):
        for work in sends:
            work.wait()

    def _ready_here(self, job, p):
        """Waits until this rank's backward has filled partition p, then packs its buffers behind the gradients."""
        self._wait(lambda: job.ready[p])
        if job.events[p] is not None:
            torch.cuda.current_stream().wait_event(job.events[p])
        self.layout.push[p].pack_buffers()

    # a server that does not train: its own server (ps_train.server_step runs it)
    own_server = True

    def serve_step(self, optimizer, lr):
        """A server's step: one exchange, ending with the trainers' pulls (the updater steps the optimizer it was
        given); the updater's seconds kept for its figures."""
        job = _PushPullJob(self.count, lr)
        self._exchange(job)
        self.update_seconds.append(job.update_seconds)

    def end_serving(self):
        pass  # the last step's pulls were the epoch's final pull

    def server_figures(self, sums, timed, lrs):
        """Its update time is the updater's (over the last `timed` steps), its wait the rest until a pull."""
        update, self.update_seconds = sum(self.update_seconds[-timed:]) / timed, []
        return ServerStats(sums.get("serve", 0.0) / timed, sums.get("push_wait", 0.0) / timed - update, update,
                           lrs=lrs)


class Pipelined(_Exchange):
    """--comm pipelined (BytePS's push-sum-pull per partition, P3's order), on the Partitions layout. A partition is
    pushed (its gradients and its modules' buffers, one message) point-to-point to its owner as soon as backward has
    filled it; its owner sums the pushes in the trainers' order (p2p's exact sum), averages and updates that
    partition alone (torch's SGD step for its parameters: the same math as one optimizer.step()) and sends it back
    to every trainer, as soon as every push to it has arrived; each module of the next forward waits, in a
    pre-hook, only for the partitions holding its own tensors. A "comm" step returns with its exchange in flight:
    the next forward, flush() or end_epoch() ends it; the yardstick's "blocking" kind runs the same exchange
    whole after backward.

    Bytes: a trainer sends every partition it does not own once and receives it back once; an owner receives its
    own from each other trainer and sends it back to each. With N trainers that all own a balanced share, that is
    2(N-1)/N x state through every link, each way at once, the all-reduce's bytes (gloo's reduce is not this
    pattern and moved 28% more); with one server, a star of the same messages.

    The threads: the training thread (this class) hands each step's exchange to a communication thread, which
    issues it in the order _Exchange keeps; an owner's updater thread sums, updates and packs each of its
    partitions as soon as its pushes are in (during backward, for all but the last few), so the pulls find them
    ready. A server that does not train (one server) runs the same sequence in serve_step, with its updater beside
    it.
    """
    overlaps, updates_itself = True, True

    def __init__(self, layout, rank, trainers, model, optimizer=None):
        super().__init__(layout, rank, trainers, optimizer)
        self.pending = self.job = None  # the exchange the next forward takes in; the one this step started
        if not self.trains:
            return
        part_of = {id(t): i for i, b in enumerate(layout.pull) for t in b.tensors}
        for m in model.modules():
            needs = sorted({part_of[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
                            if id(t) in part_of}, reverse=True)
            if needs:
                m.register_forward_pre_hook(lambda module, inputs, needs=needs: self._before_forward(needs))
        self.push_of = {id(p): i for i, b in enumerate(layout.push) for p in b.tensors[:b.grads]}
        for p in layout.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        threading.Thread(target=run_jobs, args=(self, self.jobs, self._exchange, self.stream), daemon=True).start()

    def blocking_twin(self):
        return self  # inactive: push() runs the whole exchange after backward

    def pull(self):
        if self.active:  # the exchange the last step left in flight is taken in by this forward, module by module
            if self.pending is not None:
                self.flush()
            self.pending, self.job = self.job, _PushPullJob(self.count, self.lr)
            self.jobs.put(self.job)

    def _before_forward(self, needs):
        if self.active and self.pending is not None:
            self._apply(self.pending, needs)

    def finish_pull(self):
        if self.pending is not None:  # partitions no module asked for (parameters unused in forward)
            self._apply(self.pending, range(self.count))
            self.pending = None

    def _grad_ready(self, param):  # autograd's thread
        if not self.active:
            return
        job, p = self.job, self.push_of[id(param)]
        job.filled[p] += 1
        if job.filled[p] == self.layout.push[p].grads:
            self._ready(job, [p])

    def _ready(self, job, parts):
        events = {p: record_event(self.device) for p in parts}  # the communication stream waits for the gradients
        with self.changed:
            for p in parts:
                job.events[p], job.ready[p] = events[p], True
            self.changed.notify_all()

    def push(self):
        if self.active:  # partitions whose gradients never all arrived (unused parameters: zeros) go too
            self._ready(self.job, [p for p in range(self.count) if not self.job.ready[p]])
            return
        self.flush()
        job = _PushPullJob(self.count, self.lr)
        self._ready(job, range(self.count))
        self.jobs.put(job)
        self._end(job)

    def flush(self):
        for job in (self.pending, self.job):
            if job is not None:
                self._end(job)
        self.pending = self.job = None

    def end_epoch(self):
        self.flush()

    def _end(self, job):
        """Takes in every partition of `job` and waits until its last send has ended (nothing of it in flight)."""
        self._apply(job, range(self.count))
        self._wait(lambda: job.finished)

    def _apply(self, job, parts):
        """Takes the pulls of `parts` into the model, once each."""
        parts = [p for p in parts if p not in job.applied]
        if parts:
            self._take_in(job, parts)

    @measure.phase("pull", after="compute")
    def _take_in(self, job, parts):
        """Waits for the pulls of `parts` and takes them into the model."""
        for p in parts:
            self._wait(lambda: job.pulled[p] is not None)
            work, event = job.pulled[p]
            if work is not None:  # a trainer: the owner's partition arrives
                work.wait()
                self.layout.pull[p].unpack()
            elif event is not None:  # the owner: its own update, made on the communication stream
                torch.cuda.current_stream().wait_event(event)
            job.applied.add(p)

    def final_pull(self):
        """Every rank, nothing in flight after it: each owner sends its partitions to every trainer."""
        self.flush()
        sends, receives = [], []
        for p in reversed(range(self.count)):
            bucket = self.layout.pull[p]
            if bucket.owner == self.rank:
                bucket.pack()
                sends += [dist.isend(bucket.flat, peer, group=self.group, tag=self.count + p)
                          for peer in self.peers(self.rank)]
            elif self.trains:
                receives.append((dist.irecv(bucket.flat, bucket.owner, group=self.group, tag=self.count + p), bucket))
        for work in sends:
            work.wait()
        for work, bucket in receives:
            work.wait()
            bucket.unpack()
