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
  * the asynchronous PS: no per-step bound (pulls and pushes of different workers interleave);
  * servers of their own (--server-ranks k, BytePS's placement, on nodes of their own): each worker's link carries
    the model once each way (M: its push out, its pull in), each server's link the n workers' pushes of its shard
    in and their pulls out (n M / k each way): the busiest link max(M, nM/k), in time max(M/B, nM/(kB)) against
    the ring's 2(n-1)M/(nB) (BytePS, OSDI 2020).
- Bytes an all-reduce's own pattern moves through each node link, with N processes on M nodes (ranks placed
  node by node): a flat ring (DDP on gloo, and the manual all-reduce's overlap, bucketed, per-param, ring and
  pipelined modes) passes 1/N of the gradients across every node boundary in each of its 2(N-1) steps:
  2(N-1)/N x gradients; the two-level all-reduce (--sync hierarchical: reduce-scatter inside a node, all-reduce
  across nodes, all-gather inside) sends across only in its middle step, each of a node's processes its 1/(N/M)
  share in a ring of M: 2(M-1)/M x gradients, the bound above. On one process per node the two are the same.
- The physical limit of a step: it cannot be shorter than its compute (the yardstick's step without any
  communication) nor than its measured bytes at the link rate (the first point): the larger of the two. It is
  held against the step of the same measurement (the yardstick's step with communication, on the same fixed
  batch), never against the epochs' step (another batch mix, with data loading): limit / step below 1 beyond the
  pairs' spread means time went elsewhere (waiting, the exchange not overlapping compute); within the spread the
  step is at the limit; above 1 beyond the spread is impossible, so a measurement problem.
"""
import dataclasses

from .runs import KINDS


@dataclasses.dataclass(frozen=True)
class LinkFigures:
    rate: str  # as declared, e.g. "100mbit"
    sent: float  # bytes per step through the busiest node link, measured
    received: float
    link_time: float  # seconds: the measured bytes at the link rate, a lower bound on their transfer
    link_time_how: str
    bound_bytes: float = None  # per direction: the least the method must move through the busiest link
    bound_how: str = ""
    rate_bits: float = None  # the link rate, bits/s
    star: bool = False  # the p2p star: pull, then push, the two directions one after the other
    pattern: str = None  # an all-reduce's pattern across the node links: "flat ring", "two-level", "<backend>'s choice"
    ring_bytes: float = None  # per direction through each node link: a flat ring's 2(N-1)/N x gradients
    two_level_bytes: float = None  # the two-level all-reduce's 2(M-1)/M x gradients

    @property
    def busiest(self):
        return max(self.sent, self.received)

    @property
    def expected(self):
        """(bytes per direction through the busiest link that the row's own pattern moves, how): the flat ring's or
        the two-level's for an all-reduce whose pattern is known, else the least the method moves; (None, why)
        without one."""
        if self.pattern == "flat ring" and self.ring_bytes:
            return self.ring_bytes, "flat ring: 2(N-1)/N x gradients"
        if self.pattern == "two-level" and self.two_level_bytes:
            return self.two_level_bytes, "two-level: 2(M-1)/M x gradients"
        return self.bound_bytes, self.bound_how

    def seconds(self, per_direction):
        """The time bytes per direction take at the link rate, by this row's direction rule."""
        return (2 if self.star else 1) * per_direction * 8 / self.rate_bits


def nodes(x):
    net = x.network or {}
    per_node = net.get("procs_per_node") or 1
    return net.get("nodes") or max(1, x.world_size // per_node)


def all_reduce_pattern(x):
    """How an all-reduce experiment crosses the node links: "two-level" (--sync hierarchical), "flat ring" (the
    manual all-reduce's other modes, DDP on gloo), "<backend>'s choice" (DDP on nccl: ring or tree, NCCL picks);
    None for a PS."""
    if x.kind == "all_reduce":
        return "two-level" if x.sync == "hierarchical" else "flat ring"
    if x.kind == "baseline_ddp":
        backend = x.first.backend
        return "flat ring" if backend == "gloo" else f"{backend or 'the backend'}'s choice"
    return None


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
    servers = byteps_bound(x)
    if servers and m > 1 and x.kind == "ps":
        bound, bound_how = max(servers["worker_bytes"], servers["server_bytes"]), servers["how"]
    elif m > 1 and x.kind in ("baseline_ddp", "all_reduce") and x.wire_bytes:
        bound, bound_how = 2 * (m - 1) / m * x.wire_bytes, f"any all-reduce: 2(M-1)/M x gradients, M={m} nodes"
    elif m > 1 and x.kind == "ps" and x.state_bytes and not x.asynchronous:
        if not x.single_server:
            bound, bound_how = 2 * (m - 1) / m * x.state_bytes, f"sharded: 2(M-1)/M x state, M={m} nodes"
        elif x.comm == "p2p":
            remote = x.world_size - per_node  # workers off the server's node: their traffic crosses its link
            bound, bound_how = remote * x.state_bytes, "star: (workers off the server's node) x state"
        else:
            bound, bound_how = x.state_bytes, "one server: at least 1 x state each way"
    pattern, ring, two_level = all_reduce_pattern(x), None, None
    if pattern and x.wire_bytes:
        ring = 2 * (x.world_size - 1) / x.world_size * x.wire_bytes
        two_level = 2 * (m - 1) / m * x.wire_bytes
    return LinkFigures(net.get("link_rate") or "?", sent, received, seconds, how, bound, bound_how,
                       net["link_rate_bits"], star, pattern, ring, two_level)


def byteps_bound(x):
    """Servers of their own (BytePS's placement): per direction, the bytes through each worker's link (the state M
    once) and each server's (n x its shard; n M / k when balanced), the time of the busier at the link rate, the
    ring's time for the same n workers, and the bound in a sentence; for DDP the ring's alone; None otherwise."""
    data, net = x.first.data, x.network or {}
    rate = net.get("link_rate_bits")
    if x.kind == "baseline_ddp" and x.wire_bytes and rate:
        n = x.world_size
        ring = 2 * (n - 1) / n * x.wire_bytes
        return dict(worker_bytes=ring, server_bytes=None, seconds=ring * 8 / rate, ring_seconds=ring * 8 / rate,
                    how=f"ring: 2(n-1)/n x gradients, n={n}")
    where = data.get("placement") or {}
    if not (x.kind == "ps" and where.get("dedicated_servers") and x.state_bytes and rate):
        return None
    n, k, state = len(where["trainer_ranks"]), where["num_servers"], x.state_bytes
    server = n * (data.get("largest_shard_bytes") or state / k)  # the largest shard's server is the busiest
    return dict(worker_bytes=state, server_bytes=server, seconds=max(state, server) * 8 / rate,
                ring_seconds=2 * (n - 1) / n * state * 8 / rate,
                how=f"servers of their own: each worker link 1 x state each way, each server link n x its shard "
                    f"(n={n} workers, k={k} servers)")


@dataclasses.dataclass(frozen=True)
class Limit:
    """A step against its physical limit, all on the yardstick's fixed batch (seconds): the limit is the larger of
    the step without communication and its bytes' link time; the step is the same batch's step with
    communication; the noise is the pairs' spread (overhead_max - overhead_min). One measurement throughout: the
    epochs' step (avg_batch_time) is another batch mix, with data loading, and is kept only for the record."""
    step: float  # the yardstick's step with communication (step_time)
    compute: float  # the yardstick's step without communication (local_step_time)
    spread: tuple = (0.0, 0.0)  # (overhead_min, overhead_max): step minus step without communication over the pairs
    link: LinkFigures = None  # None: no declared link (loopback), the limit is the compute alone
    epoch_step: float = None

    @property
    def limit(self):
        return max(self.compute, self.link.link_time) if self.link else self.compute

    @property
    def bound_by(self):
        return "link" if self.link and self.link.link_time >= self.compute else "compute"

    @property
    def reached(self):
        """limit / step: 1.0 = at the limit."""
        return self.limit / self.step

    @property
    def verdict(self):
        """"at" (the step is at the limit within the pairs' spread), "above" (slower than the limit beyond it) or
        "impossible" (faster than the limit beyond the spread: the counters or the declared rate are off). Bound by
        compute, the step minus the step without communication is the overhead, whose pairs say it directly."""
        lo, hi = self.spread
        if self.bound_by == "compute":
            return "impossible" if hi < 0 else "at" if lo <= 0 else "above"
        gap = self.step - self.limit
        return "at" if abs(gap) <= hi - lo else "above" if gap > 0 else "impossible"

    @property
    def impossible(self):
        return self.verdict == "impossible"

    @property
    def reached_number(self):
        return f"{self.reached:.2f}"

    @property
    def reached_text(self):
        """The table's cell: the number, and whether the step is at the limit within noise."""
        return self.reached_number + {"at": " (at it, in noise)", "above": "",
                                      "impossible": " (beyond noise: a measurement problem)"}[self.verdict]


def physical_limit(x):
    """The experiment's Limit (means over seeds) on the yardstick's fixed batch, or None without the yardstick."""
    step, compute = x.mean("yardstick.step_time"), x.mean("yardstick.local_step_time")
    lo, hi = x.mean("yardstick.overhead_min"), x.mean("yardstick.overhead_max")
    if step is None or compute is None or step <= 0 or lo is None:
        return None
    return Limit(step, compute, (lo, hi), link_figures(x), x.mean("batch_time"))


# --------------------------------------------------------------------------- cost against the number of nodes
def cluster_name(key):
    """A cluster group's name: "Manual All-Reduce (bucketed) at 100mbit", with the processes per node when several."""
    kind, variant, per_node, rate, model = key
    shown = [part for part in variant.split(", ") if part and part != "none"]  # DDP without a hook
    shown += ["modeled compute"] if model else []
    return KINDS[kind][0] + (f" ({', '.join(shown)})" if shown else "") + \
        (f", {per_node} proc/node" if per_node > 1 else "") + f" at {rate}"


def cluster_points(group):
    """Per node count of a cluster group: {"nodes", "overhead" (s, None without the yardstick), "bound" (s: the
    link-rate time of the bytes its pattern must move, None without one), "bytes" (measured per direction through
    the busiest node link), "how" (the bound in words)}."""
    points = []
    for x in group:
        f = link_figures(x)
        expected, how = f.expected if f else (None, "")
        points.append({"nodes": nodes(x), "overhead": x.mean("yardstick.overhead"),
                       "bound": f.seconds(expected) if expected else None, "bytes": f.busiest if f else None,
                       "how": how})
    return points


# --------------------------------------------------------------------------- a slow link, per node
def _ok(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def node_link_words(epochs):
    """What the run measured of each node's link (epochs[].node_links, measure.LinkMeter), in words: the slow link
    each epoch named (its rate against the others' median, what it cost per step), or that none was slower beyond
    the noise, with each node's rate; None when no epoch records it. Only reads the run's own verdict."""
    records = [(e.get("epoch"), e["node_links"]) for e in epochs if isinstance(e.get("node_links"), dict)
               and isinstance(e["node_links"].get("rate"), list) and e["node_links"].get("nodes")]
    if not records:
        return None
    from .ranks import epochs_text
    named = {}
    for epoch, r in records:
        s = r.get("slow")
        if isinstance(s, dict) and all(_ok(s.get(k)) for k in ("node", "rate", "others_rate", "cost_per_step")):
            named.setdefault(s["node"], []).append((epoch, s))
    if named:
        parts = []
        for node, hits in sorted(named.items()):
            mean = lambda k: sum(s[k] for _, s in hits) / len(hits)  # noqa: E731
            parts.append(f"node {node}'s link moved its bytes at {mean('rate') / 1e6:.1f} MB/s, "
                         f"{mean('others_rate') / mean('rate'):.1f}x slower than the others' median "
                         f"({mean('others_rate') / 1e6:.1f} MB/s) in {epochs_text([ep for ep, _ in hits])}; "
                         f"~{1e3 * mean('cost_per_step'):.0f} ms per step more than its "
                         f"{mean('bytes_per_step') / 1e6:.1f} MB take at the others' rate")
        return "; ".join(parts)
    nodes = records[-1][1]["nodes"]
    rates = [sum(r["rate"][i] for _, r in records) / len(records) for i in range(len(nodes))]
    return (f"no node's link was slower than the others' beyond the noise in {epochs_text([ep for ep, _ in records])} "
            f"(rates, the faster direction's bytes per busy second: "
            + ", ".join(f"node {n} {v / 1e6:.1f} MB/s" for n, v in zip(nodes, rates)) + ")")
