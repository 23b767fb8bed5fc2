"""Kernel-shaped links (``net.backend=kernel``): each rank in a network namespace of its own, joined to
the others through veth pairs and a bridge, every node's uplink and downlink shaped by ``tc``.

The emulated links of lowbw.net.link are arithmetic; this module makes the Linux kernel the network
instead, so that an emulated run can be held against real TCP over a shaped link (docs/networks.md,
"Emulated and kernel-shaped links"; ``scripts/bench_fidelity.py``). lowbw adds no emulation on top.

Layout for a run of N ranks (names carry the launcher's pid, so that a later run can remove what a
killed launcher left behind, :func:`remove_stale`)::

    lowbw-<pid>-<k>-r0: lowbw0 127.100.0.1/24 --veth-- r0 ┐
    lowbw-<pid>-<k>-r1: lowbw0 127.100.0.2/24 --veth-- r1 ├ bridge "br0" in lowbw-<pid>-<k>-hub
    ...                                                   ┘

- **Addresses** are loopback-range addresses inside namespaces this module made (the node namespaces
  leave their own ``lo`` down and set ``route_localnet``, so 127.100.0.0/24 routes over the veth):
  nothing is ever addressed outside the machine.
- **Uplink** of rank i (egress of its ``lowbw0``): an HTB class at the node's uplink rate, and under
  it one class per peer j at the pair's bandwidth (``Topology.link(i, j)``: min of uplink, downlink and
  pair cap), chosen by destination address; a peer's one-way latency, where non-zero, is a netem
  leaf of its class.
- **Downlink** of rank j (egress of the bridge's port ``r<j>`` toward the node): TBF at the node's
  downlink rate, with a queue of :data:`QUEUE_S` seconds at that rate.
- Infinite rates and zero latencies add no qdisc.

Kernels without ``sch_netem`` (this one: ``tc qdisc add ... netem`` answers "Specified qdisc kind is
unknown") cannot delay packets: :func:`check_supported` refuses latency, jitter and loss there with
a sentence. Jitter and loss are refused everywhere: lowbw's jitter is exponential and its loss model
a throughput ceiling (lowbw.net.conditions), neither of which netem reproduces as such.

A rank enters its namespace first thing (:func:`enter_namespace`, before it starts a thread: a
namespace is per thread, and threads inherit the one of the thread that made them) and binds gloo
to ``lowbw0`` (GLOO_SOCKET_IFNAME). Everything is removed when the run ends, fails or is interrupted
(:meth:`KernelNetwork.__exit__`); deleting a namespace deletes its veth ends and qdiscs.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from lowbw.errors import ConfigError
from lowbw.net.conditions import Conditions
from lowbw.net.liveness import process_alive
from lowbw.net.topology import Topology

NETNS_DIR = Path("/run/netns")  # where `ip netns add` keeps named namespaces
PREFIX = "lowbw-"
NODE_IF = "lowbw0"  # a rank's interface inside its namespace
SUBNET = "127.100.0"  # rank r is SUBNET.(r+1)/24 (loopback range: never an address outside the machine)
MAX_RANKS = 253
#: Queue of a downlink's TBF, in seconds at its rate (a home router's buffer: ~0.5 s of bufferbloat is
#: common at 20 Mbit/s, Gettys & Nichols, "Bufferbloat: Dark Buffers in the Internet", ACM Queue 2011).
QUEUE_S = 0.5
_CLONE_NEWNET = 0x40000000  # <sched.h>
_COMMAND_TIMEOUT_S = 30.0
_counter = 0
_counter_lock = threading.Lock()


def address(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def _rate(bps: float) -> str:
    return f"{int(round(bps))}bit"


def _delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_COMMAND_TIMEOUT_S)


def _run(args: list[str], what: str) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OSError(f"net.backend=kernel: {what}: `{' '.join(args)}` failed: {e}") from None
    if p.returncode != 0:
        raise OSError(f"net.backend=kernel: {what}: `{' '.join(args)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


# ---- what the machine allows ------------------------------------------------------------------------


def _has_net_admin() -> bool:
    """CAP_NET_ADMIN (bit 12) and CAP_SYS_ADMIN (bit 21, for namespaces) in this process's effective set."""
    try:
        caps = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return os.geteuid() == 0
    eff = int(caps.split()[1], 16)
    return bool(eff & (1 << 12)) and bool(eff & (1 << 21))


_NETEM: Optional[bool] = None


def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (probed once, in a namespace made and removed for it)."""
    global _NETEM
    if _NETEM is None:
        name = f"{PREFIX}{os.getpid()}-probe"
        try:
            _run(["ip", "netns", "add", name], "probe for netem")
            probe = subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                                   capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
            _NETEM = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _NETEM = False
        finally:
            _delete_namespace(name)
    return _NETEM


def check_supported(topo: Topology, conditions: Conditions, cfg: Any) -> None:
    """ConfigError, with the reason, unless this machine can run ``topo`` with kernel-shaped links."""
    if sys.platform != "linux":
        raise ConfigError("net.backend=kernel needs Linux (network namespaces, veth, tc); use net.backend=emulated")
    if not _has_net_admin():
        raise ConfigError("net.backend=kernel makes network namespaces and shapes them with tc, which needs root "
                          "(CAP_NET_ADMIN and CAP_SYS_ADMIN): run as root, or use net.backend=emulated")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"net.backend=kernel needs {' and '.join(missing)} from iproute2 (Debian/Ubuntu: apt-get "
                          "install iproute2)")
    if topo.n > MAX_RANKS:
        raise ConfigError(f"net.backend=kernel: {topo.n} ranks, at most {MAX_RANKS} (one /24 of addresses)")
    if cfg.clock.name != "wall":
        raise ConfigError(f"net.backend=kernel times the kernel's real links: it needs clock=wall (clock={cfg.clock.name})")
    if cfg.net.semantics != "pipelined":
        raise ConfigError("net.semantics=serialized is a rule of lowbw's link model; the kernel's TCP is what it is: "
                          "use net.semantics=pipelined with net.backend=kernel")
    if cfg.net.framing != "payload":
        raise ConfigError("net.framing applies to emulated links; kernel-shaped links count their real headers: "
                          "leave net.framing=payload with net.backend=kernel")
    if topo.duplex_efficiency < 1:
        raise ConfigError("net.duplex_efficiency models two-way TCP on emulated links; kernel-shaped links are two-way "
                          "TCP: leave net.duplex_efficiency=1 with net.backend=kernel")
    if any(p.jitter_s > 0 for p in topo.pairs.values()):
        raise ConfigError("net.jitter_ms > 0 with net.backend=kernel: lowbw's jitter is exponential and netem has no "
                          "such distribution built in; set net.jitter_ms=0")
    if float(cfg.net.loss_rate) > 0:
        raise ConfigError("net.loss_rate > 0 with net.backend=kernel: lowbw models loss as a TCP throughput ceiling, "
                          "which netem's packet drops do not reproduce one for one; set net.loss_rate=0")
    if conditions.outages or conditions.trace_t:
        raise ConfigError("net.backend=kernel shapes fixed rates: faults.outages and bandwidth traces are "
                          "emulated-link features; remove them or use net.backend=emulated")
    delayed = sorted({round(p.latency_s * 1e3, 3) for p in topo.pairs.values() if p.latency_s > 0})
    if delayed and not has_netem():
        raise ConfigError(f"net.latency_ms ({', '.join(map(str, delayed))} ms) with net.backend=kernel needs tc netem "
                          "for delay, and this kernel has no netem (sch_netem): set net.latency_ms=0 (and no pair "
                          "latencies) to shape rate only, or use net.backend=emulated")


# ---- tc commands --------------------------------------------------------------------------------------


def uplink_commands(topo: Topology, rank: int) -> list[list[str]]:
    """tc commands (after ``tc -n <namespace>``) shaping rank ``rank``'s uplink: HTB at the uplink rate, one
    class per peer at the pair's bandwidth (chosen by destination address), netem for a peer's latency."""
    up = topo.uplink_bps[rank]
    peers = [j for j in range(topo.n) if j != rank]
    links = {j: topo.link(rank, j) for j in peers}
    if math.isinf(up) and all(math.isinf(links[j].bandwidth_bps) and links[j].latency_s == 0 for j in peers):
        return []
    finite = [b for b in [up, *(links[j].bandwidth_bps for j in peers)] if not math.isinf(b)]
    top = up if not math.isinf(up) else 10 * max(finite, default=1e11)  # "unlimited": above every class
    dev = ["dev", NODE_IF]
    cmds = [["qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "2"],
            ["class", "add", *dev, "parent", "1:", "classid", "1:1", "htb", "rate", _rate(top), "ceil", _rate(top)],
            # unclassified traffic (ARP): the uplink's rate, lowest priority
            ["class", "add", *dev, "parent", "1:1", "classid", "1:2", "htb", "rate", _rate(min(top, 1e6)),
             "ceil", _rate(top), "prio", "7"]]
    for j in peers:
        bw = min(top, links[j].bandwidth_bps)
        cid = f"1:{10 + j:x}"
        cmds.append(["class", "add", *dev, "parent", "1:1", "classid", cid, "htb", "rate", _rate(bw), "ceil", _rate(bw)])
        cmds.append(["filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst",
                     f"{address(j)}/32", "flowid", cid])
        if links[j].latency_s > 0:
            cmds.append(["qdisc", "add", *dev, "parent", cid, "handle", f"{10 + j:x}:", "netem", "delay",
                         f"{links[j].latency_s * 1e6:.0f}us", "limit", "100000"])
    return cmds


def downlink_commands(topo: Topology, rank: int) -> list[list[str]]:
    """tc commands (after ``tc -n <hub namespace>``) shaping rank ``rank``'s downlink: TBF on the bridge port
    toward it."""
    down = topo.downlink_bps[rank]
    if math.isinf(down):
        return []
    burst = max(2 * 1514, int(down / 8 * 0.002))  # 2 ms at the rate, at least two full frames
    limit = max(4 * 1514, int(down / 8 * QUEUE_S))
    return [["qdisc", "add", "dev", f"r{rank}", "root", "tbf", "rate", _rate(down), "burst", str(burst),
             "limit", str(limit)]]


# ---- namespaces -------------------------------------------------------------------------------------


def remove_stale() -> list[str]:
    """Delete the namespaces of launchers that no longer run (one killed with SIGKILL could not clean up)."""
    removed = []
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if m and not process_alive(int(m.group(1))):
            _delete_namespace(name)
            removed.append(name)
    return removed


class KernelNetwork:
    """The namespaces, veth pairs, bridge and qdiscs of one run; a context manager that removes them."""

    def __init__(self, topo: Topology):
        global _counter
        with _counter_lock:
            _counter += 1
            k = _counter
        self.topo = topo
        self.base = f"{PREFIX}{os.getpid()}-{k}"
        self.hub = f"{self.base}-hub"
        self.nodes = [f"{self.base}-r{r}" for r in range(topo.n)]
        self._made: list[str] = []

    def rank_init(self, rank: int) -> dict:
        """What rank ``rank`` needs to enter its namespace and bind gloo there."""
        return {"netns": str(NETNS_DIR / self.nodes[rank]), "ifname": NODE_IF, "address": address(rank)}

    def __enter__(self) -> "KernelNetwork":
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name], "make a network namespace")
        self._made.append(name)

    def _build(self) -> None:
        self._ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "name", "br0", "type", "bridge"], "make the bridge")
        _run(["ip", "-n", self.hub, "link", "set", "dev", "br0", "up"], "start the bridge")
        for r, node in enumerate(self.nodes):
            self._ns(node)
            _run(["ip", "link", "add", "name", NODE_IF, "netns", node, "type", "veth", "peer", "name", f"r{r}", "netns",
                  self.hub], f"make rank {r}'s veth pair")
            _run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
                 f"let rank {r}'s namespace route its loopback-range address")
            _run(["ip", "-n", node, "addr", "add", f"{address(r)}/24", "dev", NODE_IF], f"address rank {r}")
            _run(["ip", "-n", node, "link", "set", NODE_IF, "up"], f"start rank {r}'s interface")
            _run(["ip", "-n", self.hub, "link", "set", f"r{r}", "master", "br0", "up"], f"bridge rank {r}")
            for cmd in uplink_commands(self.topo, r):
                _run(["tc", "-n", node, *cmd], f"shape rank {r}'s uplink")
            for cmd in downlink_commands(self.topo, r):
                _run(["tc", "-n", self.hub, *cmd], f"shape rank {r}'s downlink")

    def remove(self) -> None:
        """Delete every namespace this run made (their veth ends, bridge and qdiscs go with them)."""
        while self._made:
            _delete_namespace(self._made.pop())


def enter_namespace(path: str) -> None:
    """Move the calling thread (call it before any other thread starts) into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
