"""The bytes through the busiest node link (measured by the kit's scripts on a declared network) against the
link rate, and the least a method must move there.

Only what the method cannot beat is called a bound:
- Measured bytes at the link rate: a link carries each direction at its rate at most, and both directions at
  once (full duplex), so the larger direction's bytes / rate is a lower bound on the time they took. The sum of the
  two is a bound only where the method cannot send and receive at once: the p2p star of a synchronous single
  server (it sends every tensor to every worker, then receives; a worker pushes only after its whole pull and its
  compute, so at most the pull's last tensors can still be on the way). A collective server is not such a case:
  gloo's broadcast and reduce may forward and combine through the workers, in both directions at once.
- Bytes the method must move (per direction, on the busiest link):
  * any all-reduce (DDP, the manual all-reduce): 2(M-1)/M x the bytes each rank hands it, on M nodes: the
    bandwidth lower bound of all-reduce (Patarasuk and Yuan, 2009), which a ring reaches;
  * the sharded PS: a reduce-scatter (push to the owners) and an all-gather (pull from them) of the state, which
    together are an all-reduce: 2(M-1)/M x the state;
  * the single server, p2p: a star, each tensor sent to and received from every worker off the server's node:
    (those workers) x the state, each way;
  * the single server with collectives: the state must leave the server's node at least once (pull) and the
    summed gradients reach it at least once (push): 1 x the state each way, a weak bound; what gloo moves
    beyond it is measured, not predicted (one copy per worker would be an estimate, and gloo can do better);
  * the asynchronous PS: no per-step bound (pulls and pushes of different workers interleave).
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class LinkFigures:
    rate: str  # as declared, e.g. "100mbit"
    sent: float  # bytes per step through the busiest node link, measured
    received: float
    link_time: float  # seconds: the measured bytes at the link rate, a lower bound on their transfer
    link_time_how: str
    bound_bytes: float = None  # per direction: the least the method must move through the busiest link
    bound_how: str = ""

    @property
    def busiest(self):
        return max(self.sent, self.received)


def nodes(x):
    net = x.network or {}
    per_node = net.get("procs_per_node") or 1
    return net.get("nodes") or max(1, x.world_size // per_node)


def link_figures(x):
    """LinkFigures of an experiment (its first run), or None without a declared link and measured bytes."""
    net, link = x.network or {}, x.first.link
    if not link or not net.get("link_rate_bits"):
        return None
    sent, received = link
    star = x.kind == "ps" and x.single_server and x.comm == "p2p" and not x.asynchronous
    seconds = (sent + received if star else max(sent, received)) * 8 / net["link_rate_bits"]
    how = ("pull, then push: the two one after the other" if star else
           "both directions at once: the larger")
    m, per_node = nodes(x), net.get("procs_per_node") or 1
    bound, bound_how = None, "no per-step bound (measured only)"
    if m > 1 and x.kind in ("baseline_ddp", "all_reduce") and x.wire_bytes:
        bound, bound_how = 2 * (m - 1) / m * x.wire_bytes, f"any all-reduce: 2(M-1)/M x gradients, M={m} nodes"
    elif m > 1 and x.kind == "ps" and x.state_bytes and not x.asynchronous:
        if not x.single_server:
            bound, bound_how = 2 * (m - 1) / m * x.state_bytes, f"sharded: 2(M-1)/M x state, M={m} nodes"
        elif x.comm == "p2p":
            remote = x.world_size - per_node  # workers off the server's node: their traffic crosses its link
            bound, bound_how = remote * x.state_bytes, "star: (workers off the server's node) x state"
        else:
            bound, bound_how = x.state_bytes, "one server: at least 1 x state each way"
    return LinkFigures(net.get("link_rate") or "?", sent, received, seconds, how, bound, bound_how)
