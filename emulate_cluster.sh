#!/usr/bin/env bash
# An emulated cluster on one Linux machine, to see what communication costs without a cluster: N nodes (network
# namespaces), each on its own rate-limited link into one switch (a Linux bridge in its own namespace): a star,
# like a real cluster's top-of-rack switch. Each link is shaped both ways with tc's token bucket (tbf). The nodes
# live on a private 10.213.0.0/24, node i = 10.213.0.(100+i) (three digits: torchrun's c10d rendezvous ranks the
# nodes by their address as a string), and are never connected to this host's network.
usage() {
  cat <<'EOF'
usage: emulate_cluster.sh up [--nodes N] [--rate RATE] [--node-rate NODE=RATE]... [--delay D] [--tcp CC] [--name NAME]
       emulate_cluster.sh torchrun [--name NAME] [--nproc-per-node P] [--nodes K] [--server-nodes S]
                                   [--max-restarts R] [--logs DIR] -- SCRIPT ARGS...
       emulate_cluster.sh run [up options] [--nproc-per-node P] [--server-nodes S] [--max-restarts R] [--logs DIR]
                                   -- SCRIPT ARGS...
       emulate_cluster.sh status [--name NAME]
       emulate_cluster.sh down [--name NAME]
       emulate_cluster.sh link-down [--name NAME] NODE SECONDS
       emulate_cluster.sh link-rate [--name NAME] NODE RATE [SECONDS]

  up        create cluster NAME (default kit; a stale one of that name is removed first): N nodes (default 4),
            each on its own link of RATE (default 1gbit; tc's bit units: kbit, mbit, gbit, ...) both ways.
            --node-rate NODE=RATE (repeatable): node NODE's link at RATE instead (a slow link from the start).
            --delay D (e.g. 2ms): one-way latency between two nodes; needs the kernel's netem qdisc.
            --tcp CC (e.g. reno, bbr): the nodes' TCP congestion control (default: this host's), one of those
            a namespace may use (/proc/sys/net/ipv4/tcp_allowed_congestion_control).
  torchrun  one torchrun per node (the first K nodes; default all), P processes each (default 1), torchrun's
            c10d rendezvous on node 0. Every node's output goes to the terminal, node i's lines prefixed
            "[node i] ", and to DIR/node<i>.log (default DIR: ./cluster_logs). --max-restarts R (default 0): a
            node's torchrun restarts its workers up to R times when one of them fails, the other nodes' torchruns
            restart theirs through the rendezvous, and a restart is not a failure (a line at the end counts them).
            --server-nodes S (default 0): the last S of the K nodes run one process each, the PS's servers of
            their own (torchrun's last S ranks: ps_train.py --comm pipelined --server-ranks S), each on its own
            link; the first K-S nodes run P processes each.
            Waits for all; once a node's torchrun exits with an error, the others get 10 s (KIT_GRACE_S) and are
            then killed; the scripts' "error:" lines are repeated above the summary. Exit status: node 0's if it
            failed, else the first failure's.
  run       up + torchrun + down in one command; the cluster is removed however it ends (also on Ctrl-C).
  status    nodes, addresses and each link's shaping.    down: kill whatever runs in the nodes, remove them.
  link-down node NODE's link goes down (its switch port: the cable pulled) for SECONDS, then up again; to
            rehearse a fault while a run is in progress, from another shell (docs/faults.md).
  link-rate node NODE's link (both ways) shaped to RATE; after SECONDS, when given, back to the cluster's rate.

Each node's environment: GLOO_SOCKET_IFNAME (its interface); for NCCL each node is a host of its own, reached
only through its link: NCCL_HOSTID (one per node), NCCL_SOCKET_IFNAME, NCCL_NET=Socket, NCCL_IB_DISABLE=1,
NCCL_SHM_DISABLE=1, NCCL_P2P_DISABLE=1, NCCL_MNNVL_ENABLE=0, and NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,NET
(unless set: into the node's log, not the terminal; a line per node at the end says which transport NCCL chose);
with GPUs (nvidia-smi), CUDA_VISIBLE_DEVICES (the GPUs dealt round robin over the processes: nodes share a GPU
only when there are fewer GPUs than processes) and KIT_SHARE_GPU=1 (ranks may share a GPU under --backend nccl);
OMP_NUM_THREADS (default 1); for the results: KIT_NET_IFNAME, KIT_NET_NODES, KIT_NET_PROCS_PER_NODE,
KIT_NET_RATE, KIT_NET_RATE_BITS (bits/s), KIT_NET_DELAY, KIT_NET_TOPOLOGY, KIT_NET_SERVER_NODES (--server-nodes).
Needs root (ip netns, tc). PYTHON: default the repo's .venv/bin/python, else python3. Example:
  sudo bash emulate_cluster.sh run --nodes 4 --rate 1gbit -- baseline_multi_card.py --epochs 1
EOF
}
set -euo pipefail
PROG=emulate_cluster.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUBNET=10.213.0 STATE_DIR=/run/emulate_cluster GRACE=${KIT_GRACE_S:-10}
die() { echo "$PROG: error: $1 ($2)" >&2; exit 2; }
try() {  # a setup command; if it fails, one line naming it and its message
  local out; out=$("$@" 2>&1) || die "'$*' failed: ${out//$'\n'/ }" "see the message; needs root with CAP_NET_ADMIN"
}
cluster_ns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NAME-(node[0-9]+|switch)\$" || true; }
ns_pids() { local ns; for ns; do ip netns pids "$ns" 2>/dev/null || true; done; }
signal_ns() { local sig=$1 pids; shift; pids=$(ns_pids "$@"); [ -z "$pids" ] || kill -s "$sig" $pids 2>/dev/null || true; }
kill_ns() {  # NAMESPACE...: SIGTERM to everything in them, up to 3 s to end, then SIGKILL
  local t; signal_ns TERM "$@"
  for t in $(seq 30); do [ -z "$(ns_pids "$@")" ] && return 0; sleep 0.1; done
  signal_ns KILL "$@"
}

parse_rate() {  # RATE -> RATE_BITS, with tc's bit units (SI and IEC prefixes, case-insensitive)
  local m
  [[ $RATE =~ ^([0-9]+(\.[0-9]+)?)([A-Za-z]*)$ ]] || die "--rate '$RATE' is not a rate" "e.g. --rate 1gbit or 100mbit"
  case "${BASH_REMATCH[3],,}" in
    bit) m=1 ;; kbit) m=1e3 ;; mbit) m=1e6 ;; gbit) m=1e9 ;; tbit) m=1e12 ;;
    kibit) m=1024 ;; mibit) m=1048576 ;; gibit) m=1073741824 ;; tibit) m=1099511627776 ;;
    *bps) die "--rate '$RATE': tc reads 'bps' as BYTES per second" "write the rate in bits, e.g. 100mbit; 1mbps = 8mbit" ;;
    '') die "--rate '$RATE' has no unit" "write e.g. 1gbit or 100mbit" ;;
    *) die "--rate '$RATE' has an unknown unit" "use tc's bit units: bit, kbit, mbit, gbit, tbit (or kibit, mibit, ...)" ;;
  esac
  RATE_BITS=$(awk -v n="${BASH_REMATCH[1]}" -v m="$m" 'BEGIN { printf "%.0f", n * m }')
  [ "$RATE_BITS" -ge 1000 ] || die "--rate '$RATE' is below 1kbit" "give a rate of at least 1kbit"
}

need_system() {
  local tool cap
  for tool in ip tc; do
    command -v $tool >/dev/null 2>&1 || die "'$tool' not found" "install iproute2, which provides ip and tc"
  done
  cap=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
  (( (16#$cap >> 12 & 1) && (16#$cap >> 21 & 1) )) ||
    die "network namespaces and tc need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)" "run it as root, e.g. sudo bash $PROG ..."
}

cluster_down() {
  local all; all=$(cluster_ns)
  if [ -n "$all" ]; then
    kill_ns $all
    for ns in $all; do ip netns del "$ns" 2>/dev/null || true; done
  fi
  rm -f "$STATE_DIR/$NAME"
}

shape() {  # NAMESPACE DEVICE [DELAY]: tbf at RATE on the device's egress (with a DELAY: netem, tbf under it)
  if [ -n "${3:-}" ]; then
    try ip netns exec "$1" tc qdisc add dev "$2" root handle 1: netem delay "$3" limit 100000
    try ip netns exec "$1" tc qdisc add dev "$2" parent 1:1 handle 10: tbf rate "$RATE" burst 1mb latency 100ms
  else
    try ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 1mb latency 100ms
  fi
}

cluster_up() {
  local i ns
  cluster_down
  trap 'trap "" INT TERM; cluster_down' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM  # never half-built
  try ip netns add "$SW"
  ip netns exec "$SW" tc qdisc add dev lo root tbf rate 1mbit burst 1mb latency 100ms >/dev/null 2>&1 ||
    die "this kernel has no tbf qdisc (token bucket), which shapes the links" "use a kernel with CONFIG_NET_SCH_TBF"
  ip netns exec "$SW" tc qdisc del dev lo root
  if [ -n "$DELAY" ]; then
    ip netns exec "$SW" tc qdisc add dev lo root netem delay "$DELAY" >/dev/null 2>&1 ||
      die "--delay needs the kernel's netem qdisc, which this kernel lacks" "drop --delay, or use a kernel with sch_netem"
    ip netns exec "$SW" tc qdisc del dev lo root
  fi
  try ip -n "$SW" link add br0 type bridge forward_delay 0 stp_state 0
  for i in $(seq 0 $((NODES - 1))); do
    ns="$NAME-node$i"
    try ip netns add "$ns"
    # the veth pair is created right in the two namespaces: it never exists in this host's namespace
    try ip link add name "eth-n$i" netns "$ns" type veth peer name "sw-p$i" netns "$SW"
    try ip -n "$ns" addr add "$SUBNET.$((100 + i))/24" dev "eth-n$i"
    try ip -n "$ns" link set lo up
    try ip -n "$ns" link set "eth-n$i" up
    try ip -n "$SW" link set "sw-p$i" master br0 up
    [ -z "$TCP_CC" ] || try ip netns exec "$ns" sysctl -qw "net.ipv4.tcp_congestion_control=$TCP_CC"
    shape "$ns" "eth-n$i" "$DELAY"  # node -> switch
    shape "$SW" "sw-p$i"            # switch -> node
  done
  try ip -n "$SW" link set br0 up
  local spec usual=$RATE usual_bits=$RATE_BITS
  for spec in ${NODE_RATES[@]+"${NODE_RATES[@]}"}; do  # NODE=RATE: checked, then that node's link reshaped
    [[ $spec =~ ^([0-9]{1,3})=(.+)$ ]] || die "--node-rate '$spec' is not NODE=RATE" "e.g. --node-rate 1=100mbit"
    i=${BASH_REMATCH[1]} RATE=${BASH_REMATCH[2]}; check_node "$i"; parse_rate
    set_rate "$i" "$RATE"
    echo "$PROG: node $i's link at $RATE"
  done
  RATE=$usual RATE_BITS=$usual_bits
  mkdir -p "$STATE_DIR"
  echo "NODES=$NODES RATE=$RATE RATE_BITS=$RATE_BITS DELAY=$DELAY" > "$STATE_DIR/$NAME"
  [ "$CMD" = run ] || trap - EXIT  # run: removed at its exit
  echo "$PROG: cluster '$NAME' up: $NODES nodes $SUBNET.100-$SUBNET.$((99 + NODES)) (namespaces $NAME-node0..$((NODES - 1)))," \
       "each on its own $RATE link (both ways) into switch $SW${NODE_RATES[*]:+ (--node-rate ${NODE_RATES[*]})}${DELAY:+, $DELAY one-way delay}${TCP_CC:+, TCP $TCP_CC}"
}

load_state() {
  [ -f "$STATE_DIR/$NAME" ] && ip netns list | grep -q "^$NAME-node0\b" ||
    die "no cluster '$NAME' is up" "start it with: $PROG up --name $NAME"
  read -r NODES RATE RATE_BITS DELAY < <(sed 's/[A-Z_]*=//g' "$STATE_DIR/$NAME")
  DELAY=${DELAY:-}
}

cluster_status() {
  local i
  echo "cluster '$NAME': $NODES nodes, star into switch $SW (bridge br0), $RATE per link each way, delay ${DELAY:-none}"
  for i in $(seq 0 $((NODES - 1))); do
    echo "node $i: namespace $NAME-node$i, eth-n$i $(ip -n "$NAME-node$i" -br addr show dev "eth-n$i" | awk '{print $2, $3}')"
    echo "  node -> switch (eth-n$i): $(ip netns exec "$NAME-node$i" tc qdisc show dev "eth-n$i" | paste -sd';')"
    echo "  switch -> node (sw-p$i):  $(ip netns exec "$SW" tc qdisc show dev "sw-p$i" | paste -sd';')"
  done
}

USED=() SHOWN=()
show() {  # PREFIX LOG: one output stream of a node into its log, all of it, and to the terminal with PREFIX on
          # each line, less what only the log needs: torchrun's INFO log, NCCL's INFO lines, c10d's warning that
          # the nodes' addresses have no host name, and the other nodes' torchruns' warning at the end that the
          # rendezvous was already shut (node 0's torchrun, which serves it, left first)
  trap '' INT TERM  # on Ctrl-C the nodes' last words still get through
  tee -a "$2" | sed -u -e '/^I[0-9]\{4\} [0-9:.]* *[0-9]* [^ ]*torch\/distributed\//d' -e '/ NCCL INFO /d' \
    -e '/\[c10d\] The hostname of the client socket cannot be retrieved/d' \
    -e '/has failed to shutdown the rendezvous .* RendezvousConnectionError/d' -e "s/^/$1/"
}
drain() {  # up to 5 s for what the nodes printed to reach the terminal and the logs
  local pid t=0
  for pid in ${SHOWN[@]+"${SHOWN[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && [ "$t" -lt 50 ]; do sleep 0.1; t=$((t + 1)); done
  done
}

on_signal() {  # Ctrl-C / TERM: pass it to everything in the nodes, give them 10 s, then kill what is left
  trap '' INT TERM
  if [ ${#USED[@]} -gt 0 ]; then
    signal_ns "$1" "${USED[@]}"
    for _ in $(seq 100); do [ -z "$(ns_pids "${USED[@]}")" ] && break; sleep 0.1; done
    kill_ns "${USED[@]}"
  fi
  drain
  echo "$PROG: interrupted (SIG$1); every process in the nodes was stopped" >&2
  exit "$2"
}

GPUS=()
find_gpus() {  # GPUS: the GPUs to deal out to the nodes: CUDA_VISIBLE_DEVICES' entries when it is set, else nvidia-smi's
  local g
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    g=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$g" -gt 0 ] && read -r -a GPUS <<< "$(seq -s ' ' 0 $((g - 1)))"
  fi
  return 0
}
node_gpus() {  # I: node I's CUDA_VISIBLE_DEVICES: the GPUs of its processes when every process of the cluster is
               # dealt the next GPU round robin (node I's first is process I*P's); no GPU twice within a node
  local n=${#GPUS[@]} j list=()
  for j in $(seq 0 $(( (NPROC < n ? NPROC : n) - 1 ))); do list+=("${GPUS[($1 * NPROC + j) % n]}"); done
  (IFS=,; echo "${list[*]}")
}

nccl_summary() {  # I: one line on what NCCL did on node I, from the NCCL INFO lines of its log; nothing without them
  local log="$LOGS/node$1.log"
  grep -q ' NCCL INFO ' "$log" 2>/dev/null || return 0
  awk -v prog="$PROG" -v node="$1" '
    !/ NCCL INFO / { next }
    match($0, /nNodes [0-9]+/) { n = substr($0, RSTART + 7, RLENGTH - 7) + 0; if (n > hosts) hosts = n }
    match($0, /NET\/Socket : Using \[[0-9]+\][^:]+/) { s = substr($0, RSTART, RLENGTH); sub(/.*\]/, "", s); ifname[s] = 1 }
    match($0, / via [^ ]+/) {
      split(substr($0, RSTART + 5, RLENGTH - 5), part, "/"); t = part[1] "/" part[2]; sub(/\(.*/, "", t)
      if (!(t in via)) order[++kinds] = t
      via[t]++; total++
    }
    END {
      for (s in ifname) ifs = ifs (ifs ? "," : "") s
      line = sprintf("%s: node %s, NCCL: %d host(s) in its largest communicator, %d connection(s)", prog, node, hosts, total)
      for (k = 1; k <= kinds; k++) {
        line = line sprintf("%s %d via %s", k == 1 ? ":" : ",", via[order[k]], order[k])
        if (order[k] == "NET/Socket" && ifs) line = line " on " ifs
        else if (order[k] != "NET/Socket") bypass = bypass (bypass ? ", " : "") order[k]
      }
      if (bypass) line = line "; WARNING: " bypass " bypass the node\047s link, which then measures nothing"
      print line
    }' "$log"
}

restart_summary() {  # K: one line on how often each node's torchrun restarted its workers, from torchrun's INFO log
  local i failed joined line=""
  for i in $(seq 0 $(($1 - 1))); do
    failed=$(grep -c 'Worker group [A-Z]*\. .*will restart worker group' "$LOGS/node$i.log" || true)
    joined=$(grep -c 'new nodes from group_rank=.*will restart worker group' "$LOGS/node$i.log" || true)
    line+="${line:+; }node $i: $((failed + joined))"
    [ $((failed + joined)) = 0 ] || line+=" ($failed when its own workers failed, $joined when another node re-joined)"
  done
  echo "$PROG: workers restarted (--max-restarts $MAX_RESTARTS, counted per node): $line" >&2
}

cluster_torchrun() {
  local k=${USE_NODES:-$NODES} port=$((29500 + RANDOM % 1000)) py=${PYTHON:-} i pids=() rcs=() failed=() out err
  [ "$k" -le "$NODES" ] || die "--nodes $k is more than the $NODES nodes of cluster '$NAME'" "bring it up with more nodes"
  [ "$SERVER_NODES" -lt "$k" ] || die "--server-nodes $SERVER_NODES leaves no worker node among $k" "use fewer server nodes or more nodes"
  [ -n "$py" ] || { [ -x "$HERE/.venv/bin/python" ] && py="$HERE/.venv/bin/python" || py=python3; }
  mkdir -p "$LOGS"
  find_gpus
  trap 'on_signal INT 130' INT; trap 'on_signal TERM 143' TERM
  echo "$PROG: torchrun on $k nodes x $NPROC process(es) of cluster '$NAME', rendezvous $SUBNET.100:$port," \
       "--max-restarts $MAX_RESTARTS; every node's output below (node i's lines prefixed [node i]), and in" \
       "$LOGS/node<i>.log" >&2
  if [ ${#GPUS[@]} -gt 0 ]; then
    local dealt="" shared="every process its own GPU"
    for i in $(seq 0 $((k - 1))); do dealt+="${dealt:+, }node $i: $(node_gpus "$i")"; done
    [ $((k * NPROC)) -le ${#GPUS[@]} ] || shared="shared; NCCL still goes through the links: one host per node"
    echo "$PROG: ${#GPUS[@]} GPU(s) for $((k * NPROC)) process(es), CUDA_VISIBLE_DEVICES $dealt ($shared)" >&2
  fi
  local servers_text=""
  [ "$SERVER_NODES" = 0 ] || servers_text=" (the last $SERVER_NODES the PS's server nodes, 1 process each)"
  for i in $(seq 0 $((k - 1))); do
    USED+=("$NAME-node$i")
    local log="$LOGS/node$i.log" prefix="" extra=() nproc=$NPROC
    [ "$i" -lt $((k - SERVER_NODES)) ] || nproc=1  # a server node: one process, the PS's server
    [ "$i" = 0 ] || prefix="[node $i] "
    : > "$log"
    exec {out}> >(show "$prefix" "$log"); SHOWN+=($!)
    exec {err}> >(show "$prefix" "$log" >&2); SHOWN+=($!)
    # Restarts: torchrun says why it restarts workers only in its INFO log (kept out of the terminal); and the
    # workers' store is then a new one per rendezvous round, hosted by rank 0, not torchrun's own store shared
    # by every round: in that one the restarted workers can read the addresses their predecessors left (a
    # restarted gloo or NCCL group then fails to connect: pytorch/pytorch#135712, seen here with torch 2.14)
    [ "$MAX_RESTARTS" = 0 ] || extra+=(LOGLEVEL="${LOGLEVEL:-INFO}"
      TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}")
    [ ${#GPUS[@]} = 0 ] || extra+=(CUDA_VISIBLE_DEVICES="$(node_gpus "$i")")
    # its own session: signals reach it once, through us, not also from the terminal;
    # no --node_rank: c10d ignores it (with a warning) and ranks the nodes by --local_addr
    local cmd=(setsid ip netns exec "$NAME-node$i" env GLOO_SOCKET_IFNAME="eth-n$i" NCCL_SOCKET_IFNAME="eth-n$i"
      NCCL_HOSTID="$NAME-node$i" NCCL_NET=Socket NCCL_IB_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_P2P_DISABLE=1
      NCCL_MNNVL_ENABLE=0 NCCL_DEBUG="${NCCL_DEBUG:-INFO}" NCCL_DEBUG_SUBSYS="${NCCL_DEBUG_SUBSYS:-INIT,NET}"
      KIT_SHARE_GPU="${KIT_SHARE_GPU:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" KIT_NET_IFNAME="eth-n$i"
      KIT_NET_NODES="$k" KIT_NET_PROCS_PER_NODE="$NPROC" KIT_NET_RATE="$RATE" KIT_NET_RATE_BITS="$RATE_BITS"
      KIT_NET_DELAY="$DELAY" KIT_NET_SERVER_NODES="$SERVER_NODES"
      KIT_NET_TOPOLOGY="star: $k nodes$servers_text, each on its own $RATE link into one switch${DELAY:+, $DELAY one-way delay}"
      ${extra[@]+"${extra[@]}"}
      "$py" -m torch.distributed.run --nnodes="$k" --nproc_per_node="$nproc" --max_restarts="$MAX_RESTARTS"
      --rdzv_backend=c10d --rdzv_endpoint="$SUBNET.100:$port" --rdzv_conf=is_host=$([ "$i" = 0 ] && echo 1 || echo 0)
      --local_addr="$SUBNET.$((100 + i))" --rdzv_id="$NAME-$$-$port" "$SCRIPT" ${ARGS[@]+"${ARGS[@]}"})
    "${cmd[@]}" >&"$out" 2>&"$err" {out}>&- {err}>&- &
    pids[i]=$!
    exec {out}>&- {err}>&-  # the node holds the streams' only write ends: they end with it
  done
  # A restart happens inside a node's torchrun: only a torchrun that exits with an error is a failure. The loop
  # runs no foreground command (no $(seq), and its pause is a background sleep we `wait` for): bash runs a trap
  # only once the foreground command it waits for has ended, and it may take a Ctrl-C that a finishing child
  # survived as that child's; `wait` returns at once on a trapped signal.
  local running=$k since=-1 stopped=()
  while [ "$running" -gt 0 ]; do
    running=0
    for ((i = 0; i < k; i++)); do
      [ -z "${rcs[i]:-}" ] || continue
      if kill -0 "${pids[i]}" 2>/dev/null; then running=$((running + 1)); continue; fi
      rcs[i]=0; wait "${pids[i]}" || rcs[i]=$?
      if [ "${rcs[i]}" != 0 ]; then [ "$since" = stop ] && stopped+=("$i") || failed+=("$i"); fi
    done
    if [ "$running" -gt 0 ] && [ ${#failed[@]} -gt 0 ] && [ "$since" != stop ]; then  # the others get GRACE s
      [ "$since" != -1 ] || since=$SECONDS
      if [ $((SECONDS - since)) -ge "$GRACE" ]; then since=stop; kill_ns "${USED[@]}"; fi
    fi
    [ "$running" = 0 ] || { sleep 0.25 & wait $!; }
  done
  kill_ns "${USED[@]}"  # nothing outlives the command (e.g. a worker's own children)
  drain
  trap - INT TERM
  for i in $(seq 0 $((k - 1))); do nccl_summary "$i" >&2; done
  [ "$MAX_RESTARTS" = 0 ] || restart_summary "$k"
  [ ${#failed[@]} -gt 0 ] || return 0
  for i in "${failed[@]}"; do  # the scripts' own one-line errors, from whichever node printed them
    grep -m 3 '^error: ' "$LOGS/node$i.log" | sed "s/^/[node $i] /" >&2 || true
  done
  local first=${failed[0]}  # the exit status: node 0's if it failed by itself, else the first failure's
  echo "$PROG: node $first failed first (exit code ${rcs[first]}; its log: $LOGS/node$first.log); failed: node(s)" \
       "${failed[*]}${stopped[*]:+; stopped after the ${GRACE}s grace period: node(s) ${stopped[*]}}" >&2
  [[ " ${failed[*]} " == *" 0 "* ]] && return "${rcs[0]}" || return "${rcs[first]}"
}

# ----------------------------------------------------------------------------------------------- injected faults
check_node() {
  [[ ${1:-} =~ ^[0-9]{1,3}$ ]] && [ "$1" -lt "$NODES" ] || die "node '${1:-}' is not a node of cluster '$NAME'" "nodes 0 to $((NODES - 1))"
}
check_seconds() {
  [[ ${1:-} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "'${1:-}' is not a number of seconds" "e.g. 20"
}
link_down() {  # NODE SECONDS
  check_node "${1:-}"; check_seconds "${2:-}"
  try ip -n "$SW" link set "sw-p$1" down
  echo "$PROG: $(date +%T) node $1's link down for $2 s"
  trap 'ip -n "$SW" link set "sw-p$1" up' EXIT  # never left down
  sleep "$2"
  try ip -n "$SW" link set "sw-p$1" up
  trap - EXIT
  echo "$PROG: $(date +%T) node $1's link up again"
}
set_rate() {  # NODE RATE: the tbf of both directions (under netem with --delay)
  local parent=(root) 
  [ -z "$DELAY" ] || parent=(parent 1:1 handle 10:)
  try ip netns exec "$NAME-node$1" tc qdisc change dev "eth-n$1" "${parent[@]}" tbf rate "$2" burst 1mb latency 100ms
  try ip netns exec "$SW" tc qdisc change dev "sw-p$1" root tbf rate "$2" burst 1mb latency 100ms
}
link_rate() {  # NODE RATE [SECONDS]
  local usual=$RATE
  check_node "${1:-}"; RATE=${2:-}; parse_rate; [ -z "${3:-}" ] || check_seconds "$3"
  set_rate "$1" "$RATE"
  echo "$PROG: $(date +%T) node $1's link at $RATE${3:+ for $3 s}"
  [ -n "${3:-}" ] || return 0
  trap 'set_rate "$1" "$usual"' EXIT
  sleep "$3"
  set_rate "$1" "$usual"
  trap - EXIT
  echo "$PROG: $(date +%T) node $1's link back at $usual"
}

# ----------------------------------------------------------------------------------------------- command line
CMD=${1:-}; [ $# -gt 0 ] && shift
case "$CMD" in
  -h|--help|help) usage; exit 0 ;;
  up|down|status|torchrun|run|link-down|link-rate) ;;
  '') usage >&2; exit 2 ;;
  *) die "unknown command '$CMD'" "commands: up, torchrun, run, status, down, link-down, link-rate; see --help" ;;
esac
NAME=kit NODES=4 RATE=1gbit DELAY='' TCP_CC='' NPROC=1 LOGS=./cluster_logs USE_NODES='' MAX_RESTARTS=0 SERVER_NODES=0 ARGS=() NODE_RATES=()
while [ $# -gt 0 ]; do
  case "$CMD:$1" in
    *:-h|*:--help) usage; exit 0 ;;
    torchrun:--|run:--) shift; break ;;
    *:--name|up:--nodes|up:--rate|up:--delay|run:--nodes|run:--rate|run:--delay|run:--nproc-per-node|run:--logs|\
    up:--node-rate|run:--node-rate|up:--tcp|run:--tcp|\
    torchrun:--nodes|torchrun:--nproc-per-node|torchrun:--logs|torchrun:--max-restarts|run:--max-restarts|\
    torchrun:--server-nodes|run:--server-nodes)
      [ $# -ge 2 ] || die "$1 needs a value" "see $PROG --help"
      case "$CMD:$1" in
        *:--name) NAME=$2 ;; torchrun:--nodes) USE_NODES=$2 ;; *:--nodes) NODES=$2 ;; *:--rate) RATE=$2 ;;
        *:--node-rate) NODE_RATES+=("$2") ;; *:--delay) DELAY=$2 ;; *:--nproc-per-node) NPROC=$2 ;;
        *:--tcp) TCP_CC=$2 ;;
        *:--server-nodes) SERVER_NODES=$2 ;; *:--logs) LOGS=$2 ;; *:--max-restarts) MAX_RESTARTS=$2 ;;
      esac
      shift ;;
    link-*:-*) die "'$1' is not an option of '$CMD'" "see $PROG --help" ;;
    link-*:*) break ;;  # NODE ...
    torchrun:-*|run:-*|up:*|down:*|status:*) die "'$1' is not an option of '$CMD'" "see $PROG --help" ;;
    *) break ;;  # torchrun / run: the script
  esac
  shift
done
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$ ]] || die "--name '$NAME' is not a valid name" "letters, digits, - and _, up to 32"
SW="$NAME-switch"
if [ -n "$TCP_CC" ] && ! grep -qw -- "$TCP_CC" /proc/sys/net/ipv4/tcp_allowed_congestion_control; then
  die "--tcp '$TCP_CC' is not a congestion control a namespace may use here" \
      "one of: $(cat /proc/sys/net/ipv4/tcp_allowed_congestion_control); the host's sysctl net.ipv4.tcp_allowed_congestion_control lists them"
fi
for v in NODES=--nodes NPROC=--nproc-per-node USE_NODES=--nodes; do
  var=${v%%=*}; val=${!var}
  [ -z "$val" ] && [ "$var" = USE_NODES ] && continue
  [[ $val =~ ^[1-9][0-9]{0,2}$ ]] && [ "$val" -le 100 ] || die "${v#*=} '$val' is not a whole number from 1 to 100" "e.g. ${v#*=} 4"
done
case "$CMD" in up|run) parse_rate ;; esac
[[ $MAX_RESTARTS =~ ^[0-9]{1,3}$ ]] && [ "$MAX_RESTARTS" -le 100 ] ||
  die "--max-restarts '$MAX_RESTARTS' is not a whole number from 0 to 100" "e.g. --max-restarts 1"
MAX_RESTARTS=$((10#$MAX_RESTARTS))
[[ $SERVER_NODES =~ ^[0-9]{1,2}$ ]] || die "--server-nodes '$SERVER_NODES' is not a whole number from 0 to 99" "e.g. --server-nodes 4"
SERVER_NODES=$((10#$SERVER_NODES))
[[ $GRACE =~ ^[0-9]+$ ]] || die "KIT_GRACE_S '$GRACE' is not a whole number of seconds" "e.g. KIT_GRACE_S=10"
[ -z "$DELAY" ] || [[ $DELAY =~ ^[0-9]+(\.[0-9]+)?(s|ms|us)$ ]] || die "--delay '$DELAY' is not a time" "e.g. --delay 2ms"
if [ "$CMD" = torchrun ] || [ "$CMD" = run ]; then
  [ $# -gt 0 ] || die "no training script given" "usage: $PROG $CMD [options] -- SCRIPT ARGS..."
  [ -f "$1" ] || die "script '$1' not found" "give the path of the Python script to train with"
  SCRIPT=$1; shift; ARGS=("$@")
fi
need_system

case "$CMD" in
  up) cluster_up ;;
  down) trap '' INT TERM; cluster_down ;;
  status) load_state; cluster_status ;;
  torchrun) load_state; cluster_torchrun ;;
  run) cluster_up; rc=0; cluster_torchrun || rc=$?; exit "$rc" ;;  # cluster_up's EXIT trap removes it
  link-down) load_state; [ $# -eq 2 ] || die "link-down takes NODE SECONDS" "e.g. $PROG link-down --name $NAME 1 20"
             link_down "$@" ;;
  link-rate) load_state; [ $# -eq 2 ] || [ $# -eq 3 ] || die "link-rate takes NODE RATE [SECONDS]" "e.g. $PROG link-rate --name $NAME 1 100mbit 30"
             link_rate "$@" ;;
esac
