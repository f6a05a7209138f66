"""emulate_cluster.sh: an emulated cluster of network namespaces on rate-limited links into one switch.

Needs root, `ip` and `tc` (the tests skip otherwise). Every cluster here has a name unique to this test run,
and every test checks that nothing of it (namespace, interface, state file, process) is left behind.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dist_helpers import REPO, make_image_folder, one_error_line, run_forked

EMU = REPO / "emulate_cluster.sh"
PREFIX = f"ect{os.getpid()}-"  # every cluster name of this run starts with it
SMALL = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "4", "--workers", "0", "--timeout", "2"]
TINY = [*SMALL, "--epochs", "1", "--max-steps", "3"]


def _can_make_a_namespace():
    probe = f"{PREFIX}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


if os.geteuid() != 0:
    pytest.skip("emulate_cluster.sh needs root (network namespaces, tc)", allow_module_level=True)
if not (shutil.which("ip") and shutil.which("tc")):
    pytest.skip("emulate_cluster.sh needs iproute2's ip and tc", allow_module_level=True)
if not _can_make_a_namespace():
    pytest.skip("cannot create a network namespace here (ip netns add failed)", allow_module_level=True)


def emu(*args, timeout=300, env=None, **kw):
    return subprocess.run(["bash", str(EMU), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def namespaces(prefix=PREFIX):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    return sorted(line.split()[0] for line in listed if line.startswith(prefix))


def assert_nothing_left(name):
    assert namespaces(name + "-") == []
    assert not Path("/run/emulate_cluster", name).exists()
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert " eth-n" not in root_links and " sw-p" not in root_links  # never an interface in the host's namespace
    assert "10.213.0." not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    left = namespaces()
    for ns in left:  # clean up for the next test, then fail this one
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert left == [], f"namespaces left behind: {left}"


@pytest.fixture
def data(tiny_data):
    return tiny_data


def one_line_error(proc):
    """emulate_cluster.sh's one line for a mistake (exit status 2), which names the fix in parentheses."""
    line = one_error_line(proc, "emulate_cluster.sh: error: ", code=2)
    assert line.endswith(")"), line
    return line


# --------------------------------------------------------------------------------------------- the cluster itself
def test_up_status_down(tmp_path):
    name = f"{PREFIX}a"
    up = emu("up", "--nodes", 3, "--rate", "50mbit", "--name", name)
    try:
        assert up.returncode == 0, up.stderr
        assert len(up.stdout.strip().splitlines()) == 1 and "3 nodes" in up.stdout and "50mbit" in up.stdout
        assert namespaces(name + "-") == sorted([f"{name}-node0", f"{name}-node1", f"{name}-node2", f"{name}-switch"])
        status = emu("status", "--name", name)
        assert status.returncode == 0, status.stderr
        for i in range(3):
            node, port = f"eth-n{i}", f"sw-p{i}"
            assert f"10.213.0.{100 + i}/24" in status.stdout
            addr = subprocess.run(["ip", "-n", f"{name}-node{i}", "-o", "addr", "show", "dev", node],
                                  capture_output=True, text=True).stdout
            assert f"inet 10.213.0.{100 + i}/24" in addr
            for ns, dev in ((f"{name}-node{i}", node), (f"{name}-switch", port)):  # both directions
                qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                                       capture_output=True, text=True).stdout
                assert "tbf" in qdisc and "rate 50Mbit" in qdisc, qdisc
            master = subprocess.run(["ip", "-n", f"{name}-switch", "-o", "link", "show", "dev", port],
                                    capture_output=True, text=True).stdout
            assert "master br0" in master
        host = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
        allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
        tcp = next((cc for cc in allowed if cc != host), host)  # another than the host's where one is allowed
        again = emu("up", "--nodes", 2, "--rate", "50mbit", "--tcp", tcp, "--name", name)  # a stale one is replaced
        assert again.returncode == 0 and len(namespaces(name + "-")) == 3 and f"TCP {tcp}" in again.stdout
        inside = subprocess.run(["ip", "netns", "exec", f"{name}-node1", "cat",
                                 "/proc/sys/net/ipv4/tcp_congestion_control"], capture_output=True, text=True)
        assert inside.stdout.strip() == tcp  # the nodes' own, not the host's
    finally:
        down = emu("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(name)
    assert emu("down", "--name", name).returncode == 0  # idempotent


RECEIVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5201)); s.listen(4)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    while True:
        b = c.recv(1 << 20)
        if not b or b.endswith(b"!"):
            break
    c.sendall(b"k"); c.close()
"""
SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201)); t = time.perf_counter()
c.sendall(b"x" * (int(sys.argv[2]) - 1) + b"!"); c.recv(1)
print(time.perf_counter() - t)
"""


def _transfer(name, receiver_node, receiver_ip, senders, nbytes):
    """Seconds each sender (node index) takes to push nbytes to receiver_ip, all senders at once."""
    rx = subprocess.Popen(["ip", "netns", "exec", f"{name}-node{receiver_node}", sys.executable, "-c", RECEIVER,
                           receiver_ip, str(len(senders))], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        tx = [subprocess.Popen(["ip", "netns", "exec", f"{name}-node{s}", sys.executable, "-c", SENDER, receiver_ip,
                                str(nbytes)], stdout=subprocess.PIPE, text=True) for s in senders]
        times = [float(p.communicate(timeout=60)[0]) for p in tx]
        rx.wait(timeout=10)
        return times
    finally:
        if rx.poll() is None:
            rx.kill()


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_links_are_rate_limited_through_the_switch():
    name, rate, nbytes = f"{PREFIX}r", 100e6, 12_000_000
    expected = nbytes * 8 / rate
    assert emu("up", "--nodes", 3, "--rate", "100mbit", "--name", name).returncode == 0
    try:
        [across] = _transfer(name, 2, "10.213.0.102", [0], nbytes)  # node 0 -> switch -> node 2
        [within] = _transfer(name, 0, "10.213.0.100", [0], nbytes)  # inside node 0: never on its link
        # two nodes into one: the switch's port to node 2 is the bottleneck, each flow gets about half
        shared = _transfer(name, 2, "10.213.0.102", [0, 1], nbytes // 2)
    finally:
        emu("down", "--name", name)
    assert 0.8 * expected < across < 2 * expected, (across, expected)
    assert within < 0.3 * expected, within
    assert 0.8 * expected < max(shared) < 2 * expected, (shared, expected)
    assert_nothing_left(name)


# ------------------------------------------------------------------------------------------------ training on it

def on_one_machine_and_the_cluster(tmp_path, name, nodes, script, args, per_node=1, cluster_flags=(), reference=None):
    """(results on one machine, results on `nodes` emulated nodes x `per_node` at 1 Gbit/s) of the same run: `script`
    with `args` (on the cluster also `cluster_flags`); on one machine `reference` (default `script`). The cluster is
    checked gone after."""
    one = run_forked(reference or script, *args, "--output", tmp_path / "one.json", nproc=nodes * per_node,
                     cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    run = emu("run", "--name", name, "--nodes", nodes, "--nproc-per-node", per_node, "--rate", "1gbit", "--logs",
              tmp_path / "logs", "--", REPO / script, *cluster_flags, *args, "--output", tmp_path / "cluster.json",
              cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert_nothing_left(name)
    return tuple(json.loads((tmp_path / f).read_text()) for f in ("one.json", "cluster.json"))

@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_blocking_all_reduce_overhead_tracks_the_link_rate_bound(tmp_path, data):
    """The yardstick on a slow link: `--sync bucketed` (one blocking all-reduce per bucket after backward) costs
    what its bytes take at the link rate, and the bytes the nodes' counters see are the ring's 2(N-1)/N x gradients.
    MobileNetV3-small (6 MB of gradients) over 2 nodes at 50 Mbit/s: ~1 s of communication against ~20 ms of
    compute, so the overhead is almost all link time."""
    import analysis
    from analysis.links import link_figures
    name, out = f"{PREFIX}b", tmp_path / "bucketed.json"
    proc = emu("run", "--name", name, "--nodes", 2, "--rate", "50mbit", "--logs", tmp_path / "logs", "--",
               REPO / "all_reduce_train.py", "--sync", "bucketed", "--arch", "mobilenet_v3_small", "--image-size", 32,
               "--batch-size", 4, "--workers", 0, "--epochs", 1, "--max-steps", 3, "--data-dir", data,
               "--overhead-pairs", 2, "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = analysis.load_run(out)
    f = link_figures(analysis.Experiment([run]))
    assert 0.9 * f.bound_bytes < f.busiest < 1.15 * f.bound_bytes, f  # headers: a few % on top
    assert 0.85 * f.link_time < run.yardstick.overhead < 1.4 * f.link_time, (run.yardstick.overhead, f.link_time)
    assert_nothing_left(name)


ENV_PROBE = """
import json, os, socket
keys = ["RANK", "LOCAL_RANK", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "KIT_SHARE_GPU", "LOGLEVEL",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] + [k for k in os.environ if k.startswith(("KIT_NET_", "NCCL_"))]
env = {k: os.environ.get(k) for k in keys}
ifname = os.environ["KIT_NET_IFNAME"]
env["own_interfaces"] = sorted(os.listdir("/sys/class/net"))  # the node's own, not the host's
env["tx_bytes"] = int(open(f"/sys/class/net/{ifname}/statistics/tx_bytes").read())
open(os.path.join(os.environ["OUT"], f"rank{os.environ['RANK']}.json"), "w").write(json.dumps(env))
"""


def test_every_node_gets_its_environment_and_ranks_follow_nodes(tmp_path):
    (tmp_path / "probe.py").write_text(ENV_PROBE)
    name = f"{PREFIX}e"
    proc = emu("run", "--name", name, "--nodes", 2, "--rate", "250mbit", "--nproc-per-node", 2, "--logs",
               tmp_path / "logs", "--", tmp_path / "probe.py", cwd=tmp_path, env={"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):
        env = json.loads((tmp_path / f"rank{rank}.json").read_text())
        node = rank // 2  # ranks 0-1 on node 0, 2-3 on node 1
        assert env["KIT_NET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == f"eth-n{node}"
        assert env["own_interfaces"] == [f"eth-n{node}", "lo"]
        assert env["KIT_NET_NODES"] == "2" and env["KIT_NET_PROCS_PER_NODE"] == "2"
        assert env["KIT_NET_RATE"] == "250mbit" and env["KIT_NET_RATE_BITS"] == "250000000"
        assert env["KIT_NET_DELAY"] == "" and env["OMP_NUM_THREADS"] == "1"
        assert env["KIT_NET_TOPOLOGY"] == "star: 2 nodes, each on its own 250mbit link into one switch"
    assert_nothing_left(name)


def test_a_failing_script_fails_the_run_and_leaves_nothing(tmp_path):
    name = f"{PREFIX}f"
    proc = emu("run", "--name", name, "--nodes", 2, "--logs", tmp_path / "logs", "--", REPO / "baseline_multi_card.py",
               *TINY, "--data-dir", tmp_path / "no_such_dir", "--output", tmp_path / "r.json", cwd=tmp_path)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr  # the script's own error line, from node 0
    assert "emulate_cluster.sh: node " in proc.stderr and "failed first" in proc.stderr
    assert_nothing_left(name)


HANGS = """
import os, sys, time
if os.environ["RANK"] == "1":
    sys.exit("rank 1 gives up")
time.sleep(600)  # rank 0 would wait for ever: torchrun on node 0 does not see node 1 fail
"""


def test_a_failed_node_does_not_leave_the_others_hanging(tmp_path):
    (tmp_path / "hangs.py").write_text(HANGS)
    name, start = f"{PREFIX}h", time.time()
    proc = emu("run", "--name", name, "--nodes", 2, "--logs", tmp_path / "logs", "--", tmp_path / "hangs.py",
               cwd=tmp_path, env={"KIT_GRACE_S": "2"}, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    note = proc.stderr.strip().splitlines()[-1]
    assert note.startswith("emulate_cluster.sh: node 1 failed first") and str(tmp_path / "logs" / "node1.log") in note
    assert "stopped after the 2s grace period: node(s) 0" in note
    assert "rank 1 gives up" in (tmp_path / "logs" / "node1.log").read_text()
    assert _processes_mentioning(str(tmp_path / "hangs.py")) == []
    assert_nothing_left(name)


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_ctrl_c_stops_everything_and_removes_the_cluster(tmp_path, data):
    name, out = f"{PREFIX}c", tmp_path / "r.json"
    cmd = ["bash", str(EMU), "run", "--name", name, "--nodes", 2, "--logs", tmp_path / "logs", "--",
           REPO / "baseline_multi_card.py", *SMALL, "--epochs", "500", "--data-dir", data,
           "--output", out]
    # SIGINT as at a terminal: a shell ignores it in what it starts in the background (`pytest ... &`), and bash
    # cannot trap a signal that was ignored when it started
    proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        start = time.time()
        while not out.exists():  # training has started: the first epoch is written
            assert proc.poll() is None and time.time() - start < 180, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "interrupted" in err
    assert json.loads(out.read_text())["status"] == "incomplete"
    assert _processes_mentioning(str(out)) == []  # no torchrun, no worker
    assert_nothing_left(name)


# ------------------------------------------------------------------------------------------------ one-line errors
def test_mistakes_are_one_line_errors(tmp_path):
    name = f"{PREFIX}x"
    cases = [(["up", "--nodes", "0"], "--nodes '0'"), (["up", "--nodes", "four"], "--nodes 'four'"),
             (["up", "--nodes", "101"], "--nodes '101'"), (["up", "--rate", "1gbps"], "BYTES per second"),
             (["up", "--rate", "100"], "no unit"), (["up", "--rate", "fast"], "not a rate"),
             (["up", "--delay", "soon"], "--delay 'soon'"), (["up", "--bogus"], "'--bogus' is not an option"),
             (["up", "--tcp", "nosuch"], "--tcp 'nosuch' is not a congestion control"),
             (["torchrun", "--nproc-per-node", "0", "--", "x.py"], "--nproc-per-node '0'"),
             (["torchrun", "--"], "no training script given"),
             (["run", "--", "no_such_script.py"], "script 'no_such_script.py' not found"),
             (["torchrun", "--", REPO / "baseline_multi_card.py"], f"no cluster '{name}' is up")]
    for args, expected in cases:
        args = [args[0], "--name", name, *args[1:]]
        assert expected in one_line_error(emu(*args, cwd=tmp_path)), args
    assert_nothing_left(name)


def test_missing_tc_is_one_line_error(tmp_path):
    bin_dir = tmp_path / "bin"  # everything on PATH except tc
    bin_dir.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for tool in Path(d).iterdir() if Path(d).is_dir() else []:
            if tool.name != "tc" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    name = f"{PREFIX}p"
    err = one_line_error(emu("up", "--name", name, env={"PATH": str(bin_dir)}))
    assert "'tc' not found" in err and "iproute2" in err
    assert_nothing_left(name)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to run as a non-root user")
def test_non_root_is_one_line_error():
    """As user nobody, from a copy of the script that user can read (a checkout may sit in a folder only root
    enters, e.g. one made by mktemp -d)."""
    name, folder = f"{PREFIX}n", Path(tempfile.mkdtemp(prefix="emu-nobody-"))
    try:
        folder.chmod(0o755)
        script = Path(shutil.copy(EMU, folder / EMU.name))
        script.chmod(0o755)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(script),
                               "up", "--name", name], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(folder)
    assert "need root" in one_line_error(proc)
    assert_nothing_left(name)


# -------------------------------------------------------------------------------------------------------- run_all.sh
def test_run_all_plans_every_experiment_on_the_cluster(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_all.sh"), "--cluster", "2x1", "--link-rate", "1gbit", "--variants"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "EXTRA_ARGS": "--arch resnet18"})
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    ups = [line for line in lines if "emulate_cluster.sh up" in line]
    assert len(ups) == 1 and "--nodes 2 --rate 1gbit" in ups[0]
    commands = [line for line in lines if line.startswith("bash ") and "emulate_cluster.sh torchrun" in line]
    experiments = [line for line in lines if line.startswith("=== [")]
    assert len(commands) == len(experiments) == 13  # 3 methods, 6 more --sync modes, 3 more --comm modes, sharded
    assert all("--nodes 2 --nproc-per-node 1" in c and "--backend gloo --arch resnet18" in c for c in commands)
    assert "--standalone" not in proc.stdout
    cluster = ups[0].split("--name ")[1].split()[0]
    assert namespaces(cluster) == [] and not list(tmp_path.iterdir())  # a dry run creates nothing


# ------------------------------------------------------------------------------- every node on the terminal (#27)
def test_every_node_s_output_reaches_the_terminal_and_its_own_log(tmp_path, data):
    """The single-server PS on 2 nodes: rank 1 (node 1) is the trainer that prints the epochs and writes the results;
    its lines reach the terminal, prefixed with its node, and its log keeps them as printed."""
    name, out = f"{PREFIX}o", tmp_path / "ps.json"
    proc = emu("run", "--name", name, "--nodes", 2, "--logs", tmp_path / "logs", "--", REPO / "ps_train.py", *TINY,
               "--overhead-pairs", 0, "--data-dir", data, "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    terminal = proc.stdout.splitlines()
    assert f"[node 1] wrote {out}" in terminal
    assert any(line.startswith("[node 1] epoch 1: train loss ") for line in terminal), proc.stdout
    assert any(line.startswith("notice: ") for line in terminal)  # node 0's (rank 0's) lines are not prefixed
    node0, node1 = ((tmp_path / "logs" / f"node{i}.log").read_text() for i in (0, 1))
    assert f"\nwrote {out}\n" in "\n" + node1 and "[node 1]" not in node1
    assert "wrote" not in node0 and "notice: " in node0
    assert "The hostname of the client socket cannot be retrieved" not in proc.stdout + proc.stderr  # log only
    assert "emulate_cluster.sh: node" not in proc.stderr  # no NCCL on the CPU: no transport line
    assert_nothing_left(name)


# ------------------------------------------------------------------------------------------ restarts (#24)
RESTARTS = """
import os, sys, time
import torch.distributed as dist
out, node = os.environ["OUT"], os.environ["GROUP_RANK"]
attempt = len([f for f in os.listdir(out) if f.startswith(f"node{node}-attempt")])
tag = f"node{node}-attempt{attempt}-count{os.environ['TORCHELASTIC_RESTART_COUNT']}-pid{os.getpid()}"
dist.init_process_group("gloo")
open(os.path.join(out, tag), "w").close()
for step in range(10**6 if attempt == 0 else 5):  # the first attempt runs until a process dies
    dist.barrier()
    time.sleep(0.1)
print(f"done {tag}", flush=True)
dist.destroy_process_group()
"""


def _markers(folder, node):
    return sorted(f.name for f in folder.iterdir() if f.name.startswith(f"node{node}-attempt"))


def test_a_killed_worker_is_restarted_on_every_node_and_the_run_succeeds(tmp_path):
    """--max-restarts 1: node 1's worker is SIGKILLed; node 1's torchrun restarts it, node 0's restarts its own
    through the rendezvous, the group forms again and finishes: exit status 0, no failure reported."""
    (tmp_path / "restarts.py").write_text(RESTARTS)
    (tmp_path / "out").mkdir()
    name, start = f"{PREFIX}k", time.time()
    cmd = ["bash", str(EMU), "run", "--name", name, "--nodes", "2", "--max-restarts", "1", "--logs",
           str(tmp_path / "logs"), "--", str(tmp_path / "restarts.py")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OUT": str(tmp_path / "out")}, start_new_session=True)
    try:
        while not (_markers(tmp_path / "out", 0) and _markers(tmp_path / "out", 1)):  # the group has formed
            assert proc.poll() is None and time.time() - start < 60, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        [first] = _markers(tmp_path / "out", 1)
        os.kill(int(first.split("-pid")[1]), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    for node in (0, 1):  # a second attempt on both nodes, and it finished
        attempts = _markers(tmp_path / "out", node)
        assert [a.split("-")[1] for a in attempts] == ["attempt0", "attempt1"], attempts
        assert f"done {attempts[1]}" in (tmp_path / "logs" / f"node{node}.log").read_text()
    # node 1's torchrun counts its restart; node 0's restarted for the re-joining node 1, or for its own worker's
    # failure when that came first (torchrun counts only the latter in TORCHELASTIC_RESTART_COUNT)
    assert _markers(tmp_path / "out", 1)[1].startswith("node1-attempt1-count1-")
    summary = [line for line in stderr.splitlines() if "workers restarted" in line]
    assert len(summary) == 1 and "node 0: 1 (" in summary[0] and "node 1: 1 (1 when its own workers failed" in summary[0]
    assert "failed first" not in stderr
    info = [line for line in (stdout + stderr).splitlines() if re.match(r"(\[node \d\] )?I\d{4} ", line)]
    assert info == [] and "will restart worker group" in (tmp_path / "logs" / "node1.log").read_text()  # log only
    assert time.time() - start < 60
    assert_nothing_left(name)


FAILS = """
import os, sys, time
if os.environ["GROUP_RANK"] == "1":
    sys.exit("node 1 gives up, attempt " + os.environ["TORCHELASTIC_RESTART_COUNT"])
time.sleep(600)
"""


def test_a_node_that_keeps_failing_fails_the_run_once_its_restarts_are_spent(tmp_path):
    (tmp_path / "fails.py").write_text(FAILS)
    name, start = f"{PREFIX}s", time.time()
    proc = emu("run", "--name", name, "--nodes", 2, "--max-restarts", 1, "--logs", tmp_path / "logs", "--",
               tmp_path / "fails.py", cwd=tmp_path, env={"KIT_GRACE_S": "2"}, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    log = (tmp_path / "logs" / "node1.log").read_text()
    assert "node 1 gives up, attempt 0" in log and "node 1 gives up, attempt 1" in log
    assert "[node 1] node 1 gives up, attempt 1" in proc.stderr  # on the terminal too
    assert proc.stderr.strip().splitlines()[-1].startswith("emulate_cluster.sh: node 1 failed first")
    assert "node 1: 1 (1 when its own workers failed" in proc.stderr
    assert_nothing_left(name)


def test_max_restarts_mistakes_are_one_line_errors(tmp_path):
    name = f"{PREFIX}m"
    for value in ("-1", "one", "101"):
        err = one_line_error(emu("run", "--name", name, "--max-restarts", value, "--", REPO / "ps_train.py",
                                 cwd=tmp_path))
        assert f"--max-restarts '{value}'" in err
    assert "'--max-restarts' is not an option of 'up'" in one_line_error(emu("up", "--name", name, "--max-restarts", 1))
    assert_nothing_left(name)


def test_run_all_passes_max_restarts_to_torchrun_and_the_cluster(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "EXTRA_ARGS": "--arch resnet18"}
    for extra, expected in (([], "--standalone --nproc_per_node=4 --max_restarts=2 "),
                            (["--cluster", "2x1"], "--nproc-per-node 1 --max-restarts 2 --logs ")):
        proc = subprocess.run(["bash", str(REPO / "run_all.sh"), *extra, "--max-restarts", "2"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={**env, "NPROC": "" if extra else "4"})
        assert proc.returncode == 0, proc.stderr
        commands = [line for line in proc.stdout.splitlines() if " -- " in line or "torch.distributed.run" in line]
        commands = [c for c in commands if "analyze_results" not in c]
        assert len(commands) == 3 and all(expected in c for c in commands), commands
    plain = subprocess.run(["bash", str(REPO / "run_all.sh")], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60, env={**env, "NPROC": "4"})
    assert plain.returncode == 0 and "max_restarts" not in plain.stdout  # default: torchrun's own (0)
    bad = subprocess.run(["bash", str(REPO / "run_all.sh"), "--max-restarts", "x"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--max-restarts 'x' is not a whole number" in bad.stderr
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------- NCCL and GPUs (#23)
FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$1" = -L ] || exit 1
for i in 0 1 2; do echo "GPU $i: NVIDIA H200 (UUID: GPU-000$i)"; done
"""
FAKE_NCCL = """
import os
node, rank = os.environ["GROUP_RANK"], os.environ["RANK"]
say = lambda text: print(f"localhost:{os.getpid()}:{os.getpid() + 1} [0] NCCL INFO {text}", flush=True)
say(f"NET/Socket : Using [0]eth-n{node}:10.213.0.{100 + int(node)}<0>")
say(f"comm 0x5581 rank {rank} nRanks 4 nNodes 2 localRanks 2 localRank {os.environ['LOCAL_RANK']} MNNVL 0")
say(f"Channel 00/0 : {rank}[0] -> {(int(rank) + 1) % 4}[0] [send] via NET/Socket/0")
if rank == "3":  # as NCCL would log a path around the link
    say("Channel 01/0 : 3[0] -> 2[0] via P2P/CUMEM/read")
print(f"rank {rank} done", flush=True)
"""


def test_each_node_is_a_host_to_nccl_and_gpus_are_dealt_round_robin(tmp_path):
    """What each node's processes get for NCCL and GPUs (a fake nvidia-smi lists 3 GPUs for 2 nodes x 2
    processes), and the per-node line that reads NCCL's own INFO lines (printed here by a fake)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    (tmp_path / "probe.py").write_text(ENV_PROBE + FAKE_NCCL)
    name = f"{PREFIX}g"
    env = {k: v for k, v in os.environ.items()  # none of the caller's settings: emulate_cluster.sh's own
           if not k.startswith(("NCCL_", "TORCH_DISABLE_SHARE")) and k not in ("CUDA_VISIBLE_DEVICES", "LOGLEVEL")}
    proc = subprocess.run(["bash", str(EMU), "run", "--name", name, "--nodes", "2", "--nproc-per-node", "2",
                           "--max-restarts", "1", "--logs", str(tmp_path / "logs"), "--", str(tmp_path / "probe.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**env, "OUT": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):
        env = json.loads((tmp_path / f"rank{rank}.json").read_text())
        node = rank // 2
        assert env["NCCL_HOSTID"] == f"{name}-node{node}" and env["NCCL_SOCKET_IFNAME"] == f"eth-n{node}"
        assert (env["NCCL_NET"], env["NCCL_IB_DISABLE"], env["NCCL_SHM_DISABLE"], env["NCCL_P2P_DISABLE"],
                env["NCCL_MNNVL_ENABLE"]) == ("Socket", "1", "1", "1", "0")
        assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_DEBUG_SUBSYS"] == "INIT,NET" and env["KIT_SHARE_GPU"] == "1"
        # 3 GPUs dealt to 4 processes: node 0's are 0 and 1, node 1's 2 and (again) 0
        assert env["CUDA_VISIBLE_DEVICES"] == ["0,1", "2,0"][node]
        assert env["LOGLEVEL"] == "INFO" and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # --max-restarts
    assert "NCCL INFO" not in proc.stdout and "NCCL INFO" in (tmp_path / "logs" / "node1.log").read_text()
    assert "rank 0 done" in proc.stdout.splitlines() and "[node 1] rank 3 done" in proc.stdout.splitlines()
    lines = proc.stderr.splitlines()
    assert "emulate_cluster.sh: 3 GPU(s) for 4 process(es), CUDA_VISIBLE_DEVICES node 0: 0,1, node 1: 2,0 (shared" in \
        proc.stderr
    assert ("emulate_cluster.sh: node 0, NCCL: 2 host(s) in its largest communicator, 2 connection(s): 2 via "
            "NET/Socket on eth-n0") in lines
    [node1] = [line for line in lines if line.startswith("emulate_cluster.sh: node 1, NCCL: ")]
    assert node1.startswith("emulate_cluster.sh: node 1, NCCL: 2 host(s) in its largest communicator, 3 "
                            "connection(s): 2 via NET/Socket on eth-n1, 1 via P2P/CUMEM; WARNING: P2P/CUMEM")
    assert_nothing_left(name)


def test_gpu_sharing_is_asked_for_and_makes_each_rank_a_host_of_its_own(monkeypatch):
    """common.setup_distributed with 1 GPU for 4 processes on a node (no GPU here: CUDA and the group are faked):
    --backend nccl is an error unless KIT_SHARE_GPU=1, which puts every rank on cuda:(local rank % GPUs) with an
    NCCL_HOSTID of its own, set before the group is joined; with a GPU per process nothing changes."""
    import torch
    import torch.distributed as dist
    import common
    from dist_helpers import cli_args
    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.update(set_device=device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.update(
        backend=backend, hostid=os.environ.get("NCCL_HOSTID"), **kw))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    for key in ("KIT_SHARE_GPU", "NCCL_HOSTID"):
        monkeypatch.delenv(key, raising=False)

    def setup(gpus, local_rank, backend="nccl", **env):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        for key, value in {"RANK": local_rank + 4, "LOCAL_RANK": local_rank, "WORLD_SIZE": 8, "LOCAL_WORLD_SIZE": 4,
                           "NCCL_HOSTID": "kit-node1", **env}.items():
            monkeypatch.setenv(key, str(value))
        joined.clear()
        return common.setup_distributed(cli_args(backend=backend))

    with pytest.raises(common.UserError, match="KIT_SHARE_GPU=1 to let processes share a GPU"):
        setup(1, 3)
    ctx = setup(1, 3, KIT_SHARE_GPU=1)
    assert ctx.device == torch.device("cuda", 0) and ctx.backend == "nccl"
    assert joined["set_device"] == torch.device("cuda", 0) and joined["device_id"] == torch.device("cuda", 0)
    assert joined["hostid"] == "kit-node1-rank3"  # in place when the group is joined
    ctx = setup(2, 3, KIT_SHARE_GPU=1)
    assert ctx.device == torch.device("cuda", 1) and joined["hostid"] == "kit-node1-rank3"
    monkeypatch.setattr(common.socket, "gethostname", lambda: "gpuhost")
    ctx = setup(1, 2, KIT_SHARE_GPU=1, NCCL_HOSTID="")
    assert joined["hostid"].startswith("gpuhost-") and joined["hostid"].endswith("-rank2")  # host name + boot id
    ctx = setup(4, 3, KIT_SHARE_GPU=1)  # a GPU per process: no sharing, NCCL's own host detection
    assert ctx.device == torch.device("cuda", 3) and joined["hostid"] == "kit-node1"
    assert setup(1, 3, backend="auto", KIT_SHARE_GPU=1).backend == "gloo"  # auto: as before, NCCL only with enough


# ------------------------------------------------------------------------------- the two-level all-reduce on 2 x 2
def test_hierarchical_on_two_nodes_of_two_trains_like_ddp_and_sends_one_model_per_link(tmp_path, data):
    """--sync hierarchical on 2 emulated nodes x 2 processes: the losses of DDP on 4 processes of one machine, step
    by step (its sums in another order: float32 rounding), and through each node link one model's gradients per step
    (2(M-1)/M = 1 on M = 2 nodes) where the flat ring of 4 sends 2(N-1)/N = 1.5. MobileNetV3-small: 6 MB a step."""
    args = ["--arch", "mobilenet_v3_small", "--image-size", "16", "--batch-size", "4", "--workers", "0", "--timeout",
            "2", "--epochs", "1", "--max-steps", "3", "--overhead-pairs", "0", "--data-dir", data]
    one, hier = on_one_machine_and_the_cluster(tmp_path, f"{PREFIX}y", 2, "all_reduce_train.py", args, per_node=2,
                                               cluster_flags=["--sync", "hierarchical"],
                                               reference="baseline_multi_card.py")
    assert hier["layout"] == {"nodes": 2, "procs_per_node": 2, "levels": 2}
    assert hier["network"]["nodes"] == 2 and hier["network"]["procs_per_node"] == 2
    # rel 1e-3: on this machine step 3 differs by 2.2e-4 (the same at the last landed commit: the two-level sum's
    # order, grown through two updates of BatchNorm over 4 images of 16 px); steps 1 and 2 agree within 1e-4
    assert len(hier["all_losses"]) == 3 and hier["all_losses"] == pytest.approx(one["all_losses"], rel=1e-3)
    assert hier["all_losses"][:2] == pytest.approx(one["all_losses"][:2], rel=1e-4)
    link, gradients = hier["epochs"][0]["link"], hier["gradient_bytes"]
    busiest = max(link["sent_bytes_per_step"], link["received_bytes_per_step"])
    assert 0.95 * gradients < busiest < 1.12 * gradients, (busiest, gradients)  # the ring: 1.5 x gradients
    assert "reduce-scatter in the node" in (tmp_path / "logs" / "node0.log").read_text()


def _workers_in(namespace, script):
    """PIDs of the training processes (not torchrun) of `script` in a node's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(script.encode()) for part in cmdline) and b"torch.distributed.run" not in cmdline:
            found.append(int(pid))
    return found


def _fault_after_first_checkpoint(tmp_path, name, stem, timeout, max_restarts, fault):
    """DDP on 2 emulated nodes x 1 (100 Mbit/s, 10 steps, --checkpoint-every 2, --max-restarts `max_restarts`) and
    its reference run on one machine (tmp_path/ref.json); `fault(name)` once the first checkpoint is being written.
    Returns (name, the results path, the finished process, its stdout, its stderr, seconds it took)."""
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=40, val_per_class=2, size=16)  # 10 steps
    args = ["--arch", "mobilenet_v3_small", "--image-size", "16", "--batch-size", "4", "--workers", "0", "--timeout",
            timeout, "--epochs", "1", "--max-steps", "10", "--overhead-pairs", "0", "--log-every", "1", "--data-dir",
            data]
    ref = run_forked("baseline_multi_card.py", *args, "--output", tmp_path / "ref.json", nproc=2, cwd=tmp_path,
                     timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, start = tmp_path / f"{stem}.json", time.time()
    cmd = ["bash", str(EMU), "run", "--name", name, "--nodes", "2", "--rate", "100mbit", "--max-restarts",
           str(max_restarts), "--logs", str(tmp_path / "logs"), "--", str(REPO / "baseline_multi_card.py"),
           *map(str, args), "--checkpoint-every", "2", "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while not list(tmp_path.glob(f"{stem}.ckpt*/**/*.pt")):  # the first checkpoint (step 2) is being written
            assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(0.3)
        assert proc.poll() is None
        fault(name)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return name, out, proc, stdout, stderr, time.time() - start


def test_a_training_run_killed_mid_epoch_restarts_and_ends_as_an_uninterrupted_one(tmp_path):
    """DDP on 2 nodes x 1 with --max-restarts 2 and --checkpoint-every 2: node 1's worker is SIGKILLed mid-epoch
    after the first checkpoint; both nodes restart from it and the run ends with the losses of the same run,
    uninterrupted, on one machine (so two nodes train like one, also across a restart)."""
    def kill_node1_worker(name):
        victims = _workers_in(f"{name}-node1", "baseline_multi_card.py")
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
    name, out, proc, stdout, stderr, _ = _fault_after_first_checkpoint(tmp_path, f"{PREFIX}r", "killed", "1", 2,
                                                                        kill_node1_worker)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    # Each node restarts at least once. (A node restarted for the re-joining one sees TORCHELASTIC_RESTART_COUNT 0; it
    # knows the checkpoints as this launch's by their run.json, so no further round is needed.)
    assert "workers restarted" in stderr and "node 0: 0" not in stderr and "node 1: 0" not in stderr
    node0 = (tmp_path / "logs" / "node0.log").read_text()  # node 0 (rank 0) writes the results
    assert "restarted after epoch 0, step " in node0 and f"wrote {out}" in node0
    assert (tmp_path / "logs" / "node1.log").exists()
    one, killed = (json.loads(p.read_text()) for p in (tmp_path / "ref.json", out))
    assert killed["status"] == "complete" and len(killed["all_losses"]) == len(one["all_losses"]) == 10
    assert killed["world_size"] == one["world_size"] == 2 and killed["network"]["nodes"] == 2
    assert killed["all_losses"] == pytest.approx(one["all_losses"], rel=1e-6)
    assert killed["restarts"], killed.get("restarts")
    assert_nothing_left(name)


# ------------------------------------------------------------------------ the sharded PS, pipelined: the ideal bytes
def test_sharded_pipelined_ps_moves_the_ideal_bytes_and_trains_as_on_one_machine(tmp_path, data):
    """ps_train --servers all --comm pipelined on 3 emulated nodes x 1: each partition travels point-to-point to its
    owner and back, so each node link carries 2(N-1)/N x the state each way per step, the all-reduce's bytes (gloo's
    reduce under --comm collective moved 1.28x that on 4 nodes), give or take the shards' balance (ResNet-18's
    whole tensors: the largest shard 1.06x a third); and it trains exactly as the same run on one machine."""
    args = ["--servers", "all", "--comm", "pipelined", *TINY, "--overhead-pairs", "0", "--data-dir", data]
    single, emulated = on_one_machine_and_the_cluster(tmp_path, f"{PREFIX}q", 3, "ps_train.py", args)
    assert len(emulated["all_losses"]) == 3 and emulated["all_losses"] == pytest.approx(single["all_losses"], rel=1e-6)
    link, ideal = emulated["epochs"][0]["link"], 2 * 2 / 3 * emulated["state_bytes"]
    busiest = max(link["sent_bytes_per_step"], link["received_bytes_per_step"])
    assert 0.98 * ideal < busiest < 1.05 * ideal, (busiest, ideal)


# ------------------------------------------------------------------------------------ a slow link named (issue 36)
SLOW_LINK_ARGS = ["--synthetic", "--arch", "mobilenet_v3_small", "--image-size", "16", "--batch-size", "4",
                  "--workers", "0", "--epochs", "1", "--max-steps", "8", "--overhead-pairs", "0", "--log-every", "4",
                  "--timeout", "1"]


def _node_links(tmp_path, name, slow_node=None):
    """DDP on 3 emulated nodes at 1 Gbit/s (node `slow_node` set to 100 Mbit/s both ways with link-rate): the
    epoch's node_links record and the run's output. MobileNetV3-small: 8.2 MB through each link per step."""
    assert emu("up", "--name", name, "--nodes", 3, "--rate", "1gbit").returncode == 0
    try:
        if slow_node is not None:
            assert emu("link-rate", "--name", name, slow_node, "100mbit").returncode == 0
        out = tmp_path / "r.json"
        run = emu("torchrun", "--name", name, "--logs", tmp_path / "logs", "--", REPO / "baseline_multi_card.py",
                  *SLOW_LINK_ARGS, "--output", out, cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    finally:
        emu("down", "--name", name)
    assert_nothing_left(name)
    return json.loads(out.read_text())["epochs"][0]["node_links"], run.stdout


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_a_slow_link_is_named_with_what_it_cost(tmp_path):
    """Node 1's link at a tenth of the others' rate: the epoch line names it, and the results record each node's
    bytes and the time its link was busy for them; the slow node's link was busy about as long as its bytes take at
    100 Mbit/s (the counters, sampled, measure what the shaper did), the others' moved their faster direction at
    several times its rate."""
    links, stdout = _node_links(tmp_path, f"{PREFIX}l", slow_node=1)
    said = [line for line in stdout.splitlines() if line.startswith("slow link:")]
    assert len(said) == 1 and said[0].startswith("slow link: node 1 moved "), stdout[-3000:]
    assert links["nodes"] == [0, 1, 2] and links["slow"]["node"] == 1 and links["slow"]["ratio"] > 3, links
    moved = max(links["sent_bytes_per_step"][1], links["received_bytes_per_step"][1])
    at_rate = moved * 8 / 100e6  # tbf lets 1 MB through at once after a pause, so a little less than this
    assert 0.6 * at_rate < links["link_time_per_step"][1] < 1.5 * at_rate, (links, at_rate)
    assert 0 < links["slow"]["cost_per_step"] < links["link_time_per_step"][1]
    print(f"\n{said[0]}")


@pytest.mark.alone  # compares times: the other worker waits (conftest.py)
def test_equal_links_name_none(tmp_path):
    """Every link at 1 Gbit/s: no slow link is named, in the output or the results."""
    links, stdout = _node_links(tmp_path, f"{PREFIX}e")
    assert links["slow"] is None and "slow link:" not in stdout, links
    assert all(r > 0 for r in links["rate"]), links
    print(f"\nequal links: rates {[round(r / 1e6) for r in links['rate']]} MB/s")


def test_a_link_down_mid_run_restarts_and_ends_as_an_uninterrupted_one(tmp_path):
    """DDP on 2 nodes x 1 with --max-restarts 1 and --checkpoint-every 2: node 1's link goes down for 10 s after the
    first checkpoint; both ranks time out (--timeout 6 s), both nodes' torchruns restart their workers once the link
    is back, from the latest checkpoint, and the run ends with the losses of the same run, uninterrupted, on one
    machine. (When node 0's torchrun also starts a round for the re-joining node, a race, that round's workers see
    TORCHELASTIC_RESTART_COUNT 0 and continue from the checkpoints as this launch's: test_resume tests that rule.)"""
    def link_down(name):
        down = emu("link-down", "--name", name, 1, 10)
        assert down.returncode == 0, down.stderr
    name, out, proc, stdout, stderr, took = _fault_after_first_checkpoint(tmp_path, f"{PREFIX}d", "down", "0.1", 1,
                                                                           link_down)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    node0 = (tmp_path / "logs" / "node0.log").read_text()
    assert "restarted after epoch 0, step " in node0 and f"wrote {out}" in node0
    one, cut = (json.loads(p.read_text()) for p in (tmp_path / "ref.json", out))
    assert cut["status"] == "complete" and len(cut["all_losses"]) == len(one["all_losses"]) == 10
    assert cut["all_losses"] == pytest.approx(one["all_losses"], rel=1e-6)
    assert cut["restarts"], cut.get("restarts")
    assert_nothing_left(name)
    print(f"\nlink down 10 s: the run took {took:.1f} s; restarts {json.dumps(cut['restarts'])}")


def test_node_rate_sets_one_node_s_link_at_creation():
    """up --node-rate 1=50mbit: node 1's link at 50 Mbit/s both ways, the others at the cluster's rate; a bad spec
    or node is one line and leaves nothing."""
    name = f"{PREFIX}n"
    up = emu("up", "--name", name, "--nodes", 2, "--rate", "1gbit", "--node-rate", "1=50mbit")
    try:
        assert up.returncode == 0 and "(--node-rate 1=50mbit)" in up.stdout, up.stderr
        qdiscs = {(ns, dev): subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                                            capture_output=True, text=True).stdout
                  for ns, dev in ((f"{name}-node0", "eth-n0"), (f"{name}-switch", "sw-p0"), (f"{name}-node1", "eth-n1"),
                                  (f"{name}-switch", "sw-p1"))}
        assert [("rate 1Gbit" in q, "rate 50Mbit" in q) for q in qdiscs.values()] == \
            [(True, False), (True, False), (False, True), (False, True)], qdiscs
    finally:
        emu("down", "--name", name)
    assert_nothing_left(name)
    assert "is not NODE=RATE" in one_line_error(emu("up", "--name", name, "--nodes", 2, "--node-rate", "x"))
    assert "is not a node of cluster" in one_line_error(emu("up", "--name", name, "--nodes", 2, "--node-rate", "5=1mbit"))
    assert_nothing_left(name)


def test_servers_on_nodes_of_their_own_move_the_byteps_bytes(tmp_path, data):
    """ps_train --comm pipelined --server-ranks 2 on 2 worker nodes + 2 server nodes (--server-nodes 2: torchrun's
    last ranks on the last nodes): each worker's link carries the model once each way per step, each server's the
    two workers' pushes of its shard in and their pulls out (2 x half the state each way), within 5%; and it
    trains exactly as the same run on one machine."""
    args = ["--comm", "pipelined", "--server-ranks", "2", *TINY, "--overhead-pairs", "0", "--data-dir", data]
    one = run_forked("ps_train.py", *args, "--output", tmp_path / "one.json", nproc=4, cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    name = f"{PREFIX}v"
    run = emu("run", "--name", name, "--nodes", 4, "--server-nodes", 2, "--rate", "1gbit", "--logs", tmp_path / "logs",
              "--", REPO / "ps_train.py", *args, "--output", tmp_path / "cluster.json", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert_nothing_left(name)
    single, emulated = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "cluster.json"))
    assert emulated["all_losses"] == pytest.approx(single["all_losses"], rel=1e-6)
    assert emulated["network"]["server_nodes"] == 2 and emulated["placement"]["server_ranks"] == [2, 3]
    links, state = emulated["epochs"][0]["link_by_role"], emulated["state_bytes"]
    for role, ideal in (("worker", state), ("server", 2 * emulated["largest_shard_bytes"])):
        for way in ("sent", "received"):
            assert 0.98 * ideal < links[f"{role}_{way}_bytes_per_step"] < 1.05 * ideal, (role, way, links, ideal)


def test_run_all_puts_the_servers_on_nodes_of_their_own(tmp_path):
    """--cluster 2x1+2: 4 nodes up; the three methods on the 2 worker nodes, then the PS with 2 server nodes on all."""
    proc = subprocess.run(["bash", str(REPO / "run_all.sh"), "--cluster", "2x1+2", "--link-rate", "1gbit"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "EXTRA_ARGS": "--arch resnet18"})
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    assert any("emulate_cluster.sh up" in line and "--nodes 4 --rate 1gbit" in line for line in lines)
    commands = [line for line in lines if line.startswith("bash ") and "emulate_cluster.sh torchrun" in line]
    assert len(commands) == 4 and all("--nodes 2 --nproc-per-node 1 --logs" in c for c in commands[:3])
    assert "--nodes 4 --nproc-per-node 1 --server-nodes 2" in commands[3]
    assert "--comm pipelined --server-ranks 2" in commands[3] and "results_ps_pipelined_servers2.json" in commands[3]
    assert not list(tmp_path.iterdir())
