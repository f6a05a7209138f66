"""The exchange variants, one room each; the scripts hold the methods and choose among them.

    buckets              shared by both methods: DDP's gradient-view rule, torch's SGD step for some parameters
    allreduce            all_reduce_train's GradSync with DDP's contract (--sync per-param, bucketed, overlap, ring),
                         the ring kernel (reduce-scatter + all-gather of point-to-point sends), --sync hierarchical
                         (two-level all-reduce per bucket)
    pipelined_allreduce  --sync pipelined (each partition's update applied in the next forward)
    ps                   ps_train's exchange: its buckets and their owners (--servers), the transports' interface,
                         --comm p2p, collective, overlap, the servers' figures (the guide's server: ps_train.py)
    ps_pipelined         --comm pipelined (push-sum-pull per partition, on its partitions)
    ps_servers           --server-ranks K (servers of their own, on the pipelined transport), the PS's placement
    ps_async             --mode async (one full-duplex server)
"""
