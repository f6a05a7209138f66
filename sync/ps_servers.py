"""--server-ranks K: BytePS's placement, K ranks that only serve (each owning a shard of the partitions) and the
others that only train, on the pipelined transport (ServerRanks)."""
import torch
import torch.distributed as dist

from sync.ps_pipelined import Pipelined


def server_ranks(world_size, k):
    """The last k ranks serve (on the emulated cluster: the last k nodes, `--cluster NxP+k`)."""
    return list(range(world_size - k, world_size))


class ServerRanks(Pipelined):
    """Pipelined with the owners on ranks of their own: each partition is pushed by every trainer to its server,
    summed, averaged and updated there, and pulled back, exactly as Pipelined does; a server sends and receives
    nothing for the partitions of the others. Bytes: a trainer's link carries the model once each way per step; a
    server's, the trainers' pushes of its shard in and their pulls out: n x shard each way (n trainers).

    At the end of an epoch (swap_shards, once the epoch's link counters are read) the servers swap their shards
    among themselves (each sends its own partitions to the other servers, once), so that every server holds,
    validates and checkpoints the whole, current model; a worker's link carries none of it."""

    def __init__(self, layout, rank, trainers, servers, model, optimizer=None):
        super().__init__(layout, rank, trainers, model, optimizer)
        self.servers = list(servers)

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
