"""The exchange variants, one room each; the scripts hold the methods and choose among them.

    buckets              shared by both methods: DDP's gradient-view rule, torch's SGD step for some parameters
    allreduce            all_reduce_train's GradSync with DDP's contract (--sync per-param, bucketed, overlap, ring),
                         the ring kernel (reduce-scatter + all-gather of point-to-point sends), --sync hierarchical
                         (two-level all-reduce per bucket)
    pipelined_allreduce  --sync pipelined (each partition's update applied in the next forward)
    ps_layout            ps_train's buckets and their owners (--servers), --comm pipelined's partitions
    ps_server            the guide's single server step, and its figures
    ps_collective        the PS transports' interface, --comm p2p, collective, overlap
    ps_pipelined         --comm pipelined (push-sum-pull per partition)
    ps_async             --mode async (one full-duplex server)
"""
