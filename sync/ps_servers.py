"""--server-ranks K: BytePS's placement, K ranks that only serve (each owning a shard of the partitions) and the
others that only train, on the pipelined transport (ServerRanks)."""
import os
import threading

import torch
import torch.distributed as dist

import common
import measure
from sync.ps import SERVER, ServerStats
from sync.ps_pipelined import Pipelined


def server_ranks(world_size, k):
    """The last k ranks serve (on the emulated cluster: the last k nodes, `--cluster NxP+k`)."""
    return list(range(world_size - k, world_size))


def share_of(ctx, steps, where, comm):
    """Every rank, once an epoch: the servers' figures (their mean), and with servers of their own the bytes per
    step through the busiest worker's and the busiest server's node link since the last call (or since
    `share.reset()`, before the epochs), on every rank; then those servers swap their shards (before validation,
    after the counters: the training steps' bytes alone)."""
    def share(stats):
        shared = (stats or ServerStats()).share(ctx, steps, where["num_servers"])
        if where["dedicated_servers"] and os.environ.get("KIT_NET_IFNAME"):
            now, serves = measure.read_link_bytes(ctx), ctx.rank in where["server_ranks"]
            mine = torch.cat([(now - share.before) * (not serves), (now - share.before) * serves]) / steps
            share.before = now
            w_sent, w_received, s_sent, s_received = measure.all_reduce(mine, dist.ReduceOp.MAX).tolist()
            shared.links = dict(worker_sent_bytes_per_step=w_sent, worker_received_bytes_per_step=w_received,
                                server_sent_bytes_per_step=s_sent, server_received_bytes_per_step=s_received)
        if where["dedicated_servers"] and ctx.rank in where["server_ranks"]:
            comm.swap_shards()
        return shared

    share.reset = lambda: setattr(share, "before", measure.read_link_bytes(ctx))
    share.reset()
    return share


class ServerRanks(Pipelined):
    """Pipelined with the owners on ranks of their own: each partition is pushed by every trainer to its server,
    summed, averaged and updated there, and pulled back, exactly as Pipelined does; a server sends and receives
    nothing for the partitions of the others. Bytes: a trainer's link carries the model once each way per step; a
    server's, the trainers' pushes of its shard in and their pulls out: n x shard each way (n trainers). The
    order is BytePS's (_exchange): each partition pulled as soon as it is updated.

    At the end of an epoch (swap_shards, once the epoch's link counters are read) the servers swap their shards
    among themselves (each sends its own partitions to the other servers, once), so that every server holds,
    validates and checkpoints the whole, current model; a worker's link carries none of it."""

    def __init__(self, layout, rank, trainers, servers, model, optimizer=None, priority=False):
        if priority and dist.get_backend() != "gloo":
            raise common.UserError("--push-order priority matches sends and receives by tag, which gloo does and "
                                   "NCCL (matched by order) does not: use --push-order fill")
        self.priority = priority  # before the threads start (the updater reads it)
        super().__init__(layout, rank, trainers, model, optimizer)
        self.servers = list(servers)

    @torch.no_grad()
    def _exchange(self, job):
        """BytePS's order (not P3's): a worker sends each partition as backward fills it and posts its pull right
        after; a server posts every push it will receive at once and sends each partition back as soon as it is
        updated. A link's pulls then overlap its later pushes (both directions at once), where pulls in the next
        forward's order would all wait behind the push of the first layers, the last one backward fills."""
        if self.priority:
            return self._exchange_by_priority(job)
        sends = []
        if self.owned:  # a server
            self._post_pushes(job)
            for p in self.owned:
                self._updated(job, p)
                sends += self._send_back(job, p)
        elif self.trains:  # a worker
            for p, bucket in enumerate(self.layout.push):
                self._ready_here(job, p)
                sends.append(dist.isend(bucket.flat, bucket.owner, group=self.group, tag=p))
                pull = dist.irecv(self.layout.pull[p].flat, bucket.owner, group=self.group, tag=self.count + p)
                self._publish(job.pulled, p, (pull, None))
        self._sent(job, sends)

    @measure.phase("push")
    def _post_pushes(self, job, watched=False):
        """A server: every receive of the step's pushes posted at once, the updater told; `watched`: a watcher per
        partition says when its pushes are all in."""
        self.updates.put(job)
        for p in self.owned:
            receives = [dist.irecv(box, peer, group=self.group, tag=p)
                        for box, peer in zip(self.inbox[p], self.trainers)]
            self._publish(job.receives, p, receives)
            if watched:
                _watch(self, receives, lambda p=p: job.arrived.__setitem__(p, True))

    def _send_back(self, job, p):
        """A server: partition `p`, updated, sent to every trainer; its sends."""
        sends = self._send_out(p, self.trainers)
        self._publish(job.pulled, p, (None, None if job.updated[p] is True else job.updated[p]))
        return sends

    # --push-order priority (P3's priority on BytePS's placement, gloo only)
    def _exchange_by_priority(self, job):
        """P3's priority: a worker keeps at most one push in flight per server and, whenever a server's slot is
        free, sends it the ready partition the next forward needs first (the highest-numbered: the first layers).
        During backward that is the one just filled; once the links fall behind, the first layers' partitions,
        filled last, overtake the queue, so their pulls arrive first and the next forward starts while the later
        layers' partitions are still on the wire (cross-iteration overlap). A server updates each partition as
        soon as all its pushes are in, whatever the order, and sends it back at once. The sums, means and updates
        are _update's (exact, in the trainers' order); only the order of the messages changes, matched by tag."""
        sends = []
        if self.owned:  # a server: every receive posted at once, each partition sent back once it is updated
            self._post_pushes(job, watched=True)
            left = set(self.owned)
            while left:
                p = self._next_updated(job, left)
                sends += self._send_back(job, p)
        elif self.trains:  # a worker
            left, busy = set(range(self.count)), set()  # the servers with a push of this rank in flight
            owner = lambda q: self.layout.push[q].owner  # noqa: E731
            while left:
                p = self._take(lambda: [q for q in left if job.ready[q] and owner(q) not in busy])
                left.discard(p)
                busy.add(owner(p))
                self._ready_here(job, p)
                send = dist.isend(self.layout.push[p].flat, owner(p), group=self.group, tag=p)
                pull = dist.irecv(self.layout.pull[p].flat, owner(p), group=self.group, tag=self.count + p)
                self._publish(job.pulled, p, (pull, None))
                _watch(self, [send], lambda s=owner(p): busy.discard(s))
            self._wait(lambda: not busy)  # every push sent (its watcher waited for it: a gloo work is waited once)
        self._sent(job, sends)

    @measure.phase("push_wait")
    def _next_updated(self, job, left):
        """A server: waits for an update among the partitions `left`; the highest-numbered, taken off `left`."""
        p = self._take(lambda: [q for q in left if job.updated[q] is not None])
        left.discard(p)
        return p

    def _take(self, candidates):
        """Waits until `candidates()` (under the lock) names a partition; the highest-numbered one."""
        with self.changed:
            self.changed.wait_for(lambda: candidates() or self.error is not None)
            if self.error is not None:
                raise self.error
            return max(candidates())

    @torch.no_grad()
    def _update_owned(self, job):
        """The updater; with --push-order priority each own partition in the order its pushes complete (among
        those complete, the highest-numbered first), else Pipelined's (in partition order)."""
        if not self.priority:
            return super()._update_owned(job)
        left = set(self.owned)
        while left:
            p = self._take(lambda: [q for q in left if job.arrived[q]])
            left.discard(p)  # its receives were waited for by their watcher (a gloo work is waited for once)
            self._update_and_pack(job, p)

    @torch.no_grad()
    def swap_shards(self):
        """The servers only: each server's partitions to every other server (tags after the exchange's own)."""
        sends, receives = [], []
        for p, bucket in enumerate(self.layout.pull):
            tag = 2 * self.count + p
            if bucket.owner == self.rank:
                bucket.pack()
                sends += [dist.isend(bucket.flat, s, group=self.group, tag=tag) for s in self.servers if s != self.rank]
            else:
                receives.append((dist.irecv(bucket.flat, bucket.owner, group=self.group, tag=tag), bucket))
        for work in sends:
            work.wait()
        for work, bucket in receives:
            work.wait()
            bucket.unpack()


def _watch(engine, works, then):
    """A thread that waits for `works` (the only wait on them: a gloo work is waited for once) and then runs
    `then()` under `engine`'s lock, notifying the threads that wait on it (an error: raised again by them)."""
    def watch():
        try:
            for work in works:
                work.wait()
        except BaseException as e:  # noqa: BLE001 - raised again by the waiting threads
            with engine.changed:
                engine.error = e
                engine.changed.notify_all()
            return
        with engine.changed:
            then()
            engine.changed.notify_all()
    threading.Thread(target=watch, daemon=True).start()


def trainers_of(args, world_size):
    """The ranks that train: every rank with --servers all, all but the last K with --server-ranks K, else all but
    the server; a user error when that leaves no server or no worker."""
    if world_size < 2 and args.servers != "all":
        raise common.UserError("the parameter server needs at least 2 processes, a server and a worker "
                               "(run with torchrun --nproc_per_node=2 or more)")
    if args.server_ranks and world_size <= args.server_ranks:
        raise common.UserError(f"--server-ranks {args.server_ranks} leaves no worker among {world_size} "
                               f"processes (run more than {args.server_ranks} processes, or fewer servers)")
    if args.server_ranks:
        return list(range(world_size - args.server_ranks))
    return list(range(world_size)) if args.servers == "all" else [r for r in range(world_size) if r != SERVER]


def placement(args, world_size):
    """Which ranks serve and which train: the results' record of the PS's placement."""
    servers = server_ranks(world_size, args.server_ranks) if args.server_ranks else \
        list(range(world_size)) if args.servers == "all" else [SERVER]
    return dict(server_ranks=servers, num_servers=len(servers), trainer_ranks=trainers_of(args, world_size),
                dedicated_servers=bool(args.server_ranks))
