"""How the PS's state and gradients travel (Transport), and the synchronous transports: --comm p2p (the guide's
original), collective (the guide's improvement, the default) and overlap (BytePS-style, from hooks)."""
import torch
import torch.distributed as dist

import measure
from sync.ps_server import ServerStats, serve, server_step


class Transport:
    """How the state and the gradients travel. Synchronous transports: every rank calls pull() then push() each
    step, in the same order; pull() is skipped while the trainers already hold the owners' state (after the
    epoch's final pull); push() leaves the sums on the owners. A server that does not train serves with
    serve_step() and end_serving() (ps_train.serve_epoch's loop); final_pull() (every rank) hands every trainer
    the owners' newest state, and end_epoch() (every trainer) does what the epoch's last step still owes them."""
    overlaps = False  # pushes and pulls overlap backward and forward: the yardstick measures a blocking twin
    updates_itself = False  # the owners' updates happen inside the exchange (pipelined), not in the step

    def __init__(self, layout, rank, trainers):
        self.layout, self.rank, self.trainers = layout, rank, list(trainers)
        self.trains = rank in self.trainers
        self.fresh, self.active, self.clock, self.lr = False, True, measure.NoClock(), None

    def blocking_twin(self):
        """The transport the yardstick's "blocking" kind exchanges the same buckets with, after backward."""
        return Collective(self.layout, self.rank, self.trainers)

    def flush(self):
        """Ends every exchange a step left in flight (pipelined); nothing to do for the others."""

    def end_epoch(self, scaler):
        self.final_pull(scaler)

    def peers(self, owner):
        return [t for t in self.trainers if t != owner]

    def pull(self):
        if not self.fresh:
            self.fresh = True
            self._pull()

    def finish_pull(self):
        """Waits for what the forward pass did not need (overlap)."""

    def push(self):
        self.fresh = False
        self._push()

    def final_pull(self, scaler):
        if self.trains:
            self.pull()
            self.finish_pull()
        else:
            serve(self, scaler)

    # a server that does not train: ps_train.serve_epoch runs these, on the clock it hands over as `clock`
    asynchronous = False  # the server serves step by step (async: the epoch's pushes as they come)

    def serve_step(self, optimizer, scaler, lr):
        """The single server's step: serve the pull, gather the pushes, average, update."""
        server_step(self, optimizer, scaler, lr)

    def end_serving(self, scaler):
        """After the epoch's last step: its final pull (every trainer gets the epoch's model)."""
        serve(self, scaler)

    def server_figures(self, sums, timed, lrs):
        """The server's figures per step from its phase sums over `timed` steps."""
        return ServerStats(*(sums.get(k, 0.0) / timed for k in ("serve", "push_wait", "update")), lrs=lrs)

    def _start(self, bucket):
        """A push bucket's first contribution on this rank: its own gradients are there already (views); a
        server that does not train adds zeros; buffers are copied in."""
        if not self.trains:
            bucket.flat.zero_()
        else:
            bucket.pack_buffers()


class P2P(Transport):
    """The guide's original, tensor by tensor: the owner sends every tensor to every trainer, then receives every
    gradient (and buffer) from every trainer and sums them. With one server: a star through its link."""

    @torch.no_grad()
    def _pull(self):
        for bucket in self.layout.pull:
            for t in bucket.tensors:
                if self.rank == bucket.owner:
                    for peer in self.peers(bucket.owner):
                        dist.send(t, dst=peer)
                elif self.trains:
                    dist.recv(t, src=bucket.owner)

    @torch.no_grad()
    def _push(self):
        for bucket in self.layout.push:
            self._start(bucket)
            for slot in bucket.views:
                if self.rank == bucket.owner:  # the sum in the trainers' order, the owner's own at its place
                    own, got = slot.clone(), torch.empty_like(slot)
                    slot.zero_()
                    for trainer in self.trainers:
                        if trainer != self.rank:
                            dist.recv(got, src=trainer)
                        slot.add_(own if trainer == self.rank else got)
                elif self.trains:
                    dist.send(slot.contiguous(), dst=bucket.owner)


class Collective(Transport):
    """The guide's improvement: flat buckets, pull = broadcast from the owner, push = reduce(SUM) to it.
    Every bucket is in flight at once; then all are waited for."""

    @torch.no_grad()
    def _pull(self):
        works = [dist.broadcast(b.pack() if self.rank == b.owner else b.flat, src=b.owner, async_op=True)
                 for b in self.layout.pull]
        for work, bucket in zip(works, self.layout.pull):
            work.wait()
            if self.rank != bucket.owner:
                bucket.unpack()

    @torch.no_grad()
    def _push(self):
        for work in [self._reduce(b) for b in self.layout.push]:
            work.wait()

    def _reduce(self, bucket):
        self._start(bucket)
        return dist.reduce(bucket.flat, dst=bucket.owner, async_op=True)


class Overlap(Collective):
    """Collective, with the trainers' side overlapped: pushes start from gradient hooks during backward (in
    bucket order, so every rank issues the same collectives), and each module waits in a forward pre-hook only
    for the pull bucket holding its own tensors."""
    overlaps = True

    def __init__(self, layout, rank, trainers, model):
        super().__init__(layout, rank, trainers)
        self.pending, self.pushes, self.filled = {}, [], [0] * len(layout.grad_buckets)
        if not self.trains:
            return
        pull_of = {id(t): i for i, b in enumerate(layout.pull) for t in b.tensors}
        for m in model.modules():
            own = sorted({pull_of[id(t)] for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))})
            if own:
                m.register_forward_pre_hook(lambda module, inputs, own=own: self._wait_pull(own))
        self.push_of = {id(p): i for i, b in enumerate(layout.grad_buckets) for p in b.tensors}
        for p in layout.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _pull(self):
        if not self.trains:
            return super()._pull()
        self.pending = {i: dist.broadcast(b.pack() if self.rank == b.owner else b.flat, src=b.owner, async_op=True)
                        for i, b in enumerate(self.layout.pull)}

    def finish_pull(self):
        self._wait_pull(sorted(self.pending))

    def _wait_pull(self, indices):
        for i in indices:
            if i in self.pending and self.active:
                self._take_pull(i)

    @measure.phase("pull", after="compute")
    @torch.no_grad()
    def _take_pull(self, i):
        """Waits for pull bucket `i` and takes it into the model."""
        self.pending.pop(i).wait()
        if self.rank != self.layout.pull[i].owner:
            self.layout.pull[i].unpack()

    def _grad_ready(self, param):
        if not self.active:
            return
        self.filled[self.push_of[id(param)]] += 1
        grads = self.layout.grad_buckets
        while len(self.pushes) < len(grads) and self.filled[len(self.pushes)] == len(grads[len(self.pushes)].tensors):
            self.pushes.append(self._reduce(grads[len(self.pushes)]))

    @torch.no_grad()
    def _push(self):
        if not self.trains:
            return super()._push()
        # Buckets whose gradients never all arrived (unused parameters) go now, then the buffers.
        self.pushes += [self._reduce(b) for b in self.layout.push[len(self.pushes):]]
        for work in self.pushes:
            work.wait()
        self.pushes, self.filled = [], [0] * len(self.layout.grad_buckets)
