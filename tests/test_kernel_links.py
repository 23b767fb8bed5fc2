"""net.backend=kernel: namespaces joined by veth pairs and a bridge, shaped by tc, removed whatever happens.

These tests make network namespaces of their own (root, Linux, iproute2) and skip with the reason
elsewhere. Every address they use is a loopback-range address inside those namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from lowbw.config import NetConfig, PairConfig
from lowbw.errors import ConfigError
from lowbw.net import kernel
from lowbw.net.kernel import KernelNetwork, address, remove_stale
from lowbw.net.topology import Topology
from lowbw.validation import validate


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if not kernel._has_net_admin():
        return "making network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    probe = f"lowbw-{os.getpid()}-canmake"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"`ip netns add` failed here: {made.stderr.strip()}"


WHY_NOT = _why_not()
needs_namespaces = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
SHAPE = ["net.latency_ms=0", "pipeline.stages=2", "model.n_layer=2", "train.batch_size=4", "pipeline.microbatches=2",
         "seed=3"]
TINY = ["clock=wall", "net.backend=kernel", *SHAPE]


def _namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"lowbw-{pid}-")]


def _topology(n: int, **net) -> Topology:
    cfg = OmegaConf.structured(NetConfig(**{"latency_ms": 0.0, "uplink_mbps": 20.0, "downlink_mbps": 100.0, **net}))
    return Topology.from_config(cfg, n)


def _in(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30)


@needs_namespaces
def test_each_rank_gets_a_namespace_its_uplink_and_downlink_shaped_and_all_of_it_goes_at_the_end():
    with KernelNetwork(_topology(3)) as net:
        assert sorted(_namespaces(os.getpid())) == sorted([net.hub, *net.nodes])
        classes = subprocess.run(["tc", "-n", net.nodes[0], "class", "show", "dev", "lowbw0"], capture_output=True,
                                 text=True).stdout
        assert "class htb 1:1 root rate 20Mbit ceil 20Mbit" in classes
        assert "class htb 1:b parent 1:1" in classes and "class htb 1:c parent 1:1" in classes  # peers 1 and 2
        filters = subprocess.run(["tc", "-n", net.nodes[0], "filter", "show", "dev", "lowbw0"], capture_output=True,
                                 text=True).stdout
        assert "flowid 1:b" in filters and "flowid 1:c" in filters
        down = subprocess.run(["tc", "-n", net.hub, "qdisc", "show", "dev", "r2"], capture_output=True, text=True).stdout
        assert "tbf" in down and "rate 100Mbit" in down
        # bytes cross from rank 0's namespace to rank 2's, addressed inside the namespaces only
        server = subprocess.Popen(["ip", "netns", "exec", net.nodes[2], sys.executable, "-c",
                                   "import socket; s = socket.create_server(('%s', 7000)); s.settimeout(20); "
                                   "c, _ = s.accept(); print(len(c.recv(100)))" % address(2)],
                                  stdout=subprocess.PIPE, text=True)
        client = ("import socket, time\nfor _ in range(100):\n    try:\n"
                  f"        c = socket.create_connection(('{address(2)}', 7000), timeout=5); break\n"
                  "    except OSError: time.sleep(0.1)\nc.sendall(b'x' * 10)\n")
        assert _in(net.nodes[0], sys.executable, "-c", client).returncode == 0
        assert server.communicate(timeout=30)[0].strip() == "10"
    assert _namespaces(os.getpid()) == []


@needs_namespaces
def test_pair_caps_below_the_uplink_get_their_own_rate_and_infinite_links_no_qdisc():
    topo = _topology(2, regions=["a", "b"], pairs={"a-b": PairConfig(bandwidth_mbps=5.0)})
    with KernelNetwork(topo) as net:
        classes = subprocess.run(["tc", "-n", net.nodes[1], "class", "show", "dev", "lowbw0"], capture_output=True,
                                 text=True).stdout
        assert "class htb 1:a parent 1:1" in classes and "rate 5Mbit ceil 5Mbit" in classes
    free = _topology(2, uplink_mbps=float("inf"), downlink_mbps=float("inf"))
    assert kernel.uplink_commands(free, 0) == [] and kernel.downlink_commands(free, 0) == []


@needs_namespaces
def test_the_network_is_removed_when_the_run_inside_it_fails():
    with pytest.raises(ValueError):
        with KernelNetwork(_topology(2)):
            assert len(_namespaces(os.getpid())) == 3
            raise ValueError("the run failed")
    assert _namespaces(os.getpid()) == []


@needs_namespaces
def test_namespaces_a_killed_launcher_left_are_removed_by_the_next_run():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = f"lowbw-{gone.pid}-1-hub"
    subprocess.run(["ip", "netns", "add", left], check=True)
    try:
        assert left in remove_stale()
        assert _namespaces(gone.pid) == []
    finally:
        subprocess.run(["ip", "netns", "del", left], capture_output=True)


@needs_namespaces
def test_a_training_run_on_kernel_links_learns_as_on_emulated_ones_and_leaves_no_namespace(tmp_path):
    runs = {}
    for backend in ("kernel", "emulated"):
        p = subprocess.Popen([sys.executable, "-m", "lowbw.train", "clock=wall", *SHAPE, f"net.backend={backend}",
                              "train.steps=3",
                              f"out_dir={tmp_path / backend}"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
        assert _namespaces(p.pid) == []
        runs[backend] = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in runs["kernel"]] == [r["loss"] for r in runs["emulated"]]
    summary = json.loads((tmp_path / "kernel" / "summary.json").read_text())
    assert "shaped by the kernel" in summary["timing"]["timing"]


@needs_namespaces
def test_an_interrupted_kernel_run_is_recorded_and_its_namespaces_removed(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "lowbw.train", *TINY, "train.steps=100000", f"out_dir={tmp_path / 'run'}"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_namespaces(p.pid)) == 3
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 130, out[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    assert _namespaces(p.pid) == []


@needs_namespaces
def test_a_failed_kernel_run_names_the_rank_and_removes_its_namespaces(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "lowbw.train", *TINY, "train.steps=5", "faults.crash_rank=1",
                          "faults.crash_step=2", f"out_dir={tmp_path / 'run'}"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 1
    assert _namespaces(p.pid) == []


@pytest.mark.parametrize("overrides,match", [
    (["clock=virtual", "net.backend=kernel"], "needs clock=wall"),
    (["clock=wall", "net.backend=kernel", "net.jitter_ms=2"], "net.jitter_ms > 0 with net.backend=kernel"),
    (["clock=wall", "net.backend=kernel", "net.semantics=serialized"], "net.semantics=serialized is a rule of lowbw"),
    (["clock=wall", "net.backend=kernel", "net.framing=line"], "net.framing applies to emulated links"),
    (["clock=wall", "net.backend=kernel", "net.loss_rate=0.01"], "net.loss_rate > 0 with net.backend=kernel"),
    (["clock=wall", "net.backend=kernel", "net.duplex_efficiency=0.9"], "net.duplex_efficiency models two-way TCP"),
    (["clock=wall", "net.backend=carrier_pigeon"], "net.backend='carrier_pigeon': use emulated"),
])
def test_what_kernel_links_cannot_do_is_refused_with_the_setting_named(compose, overrides, match, monkeypatch):
    monkeypatch.setattr(kernel, "_has_net_admin", lambda: True)
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    with pytest.raises(ConfigError, match=match):
        validate(compose([*SHAPE, *overrides]))


def test_without_root_kernel_links_are_refused_in_one_sentence(compose, monkeypatch):
    monkeypatch.setattr(kernel, "_has_net_admin", lambda: False)
    with pytest.raises(ConfigError, match="needs root"):
        validate(compose(TINY))


def test_delay_on_a_kernel_without_netem_is_refused_and_names_netem(compose, monkeypatch):
    monkeypatch.setattr(kernel, "_has_net_admin", lambda: True)
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(kernel, "has_netem", lambda: False)
    with pytest.raises(ConfigError, match="this kernel has no netem"):
        validate(compose(["clock=wall", "net.backend=kernel", *SHAPE[1:], "net.latency_ms=25"]))


def test_latency_becomes_a_netem_leaf_under_the_peers_class():
    topo = _topology(2, latency_ms=25.0)
    netem = [c for c in kernel.uplink_commands(topo, 0) if "netem" in c]
    assert netem == [["qdisc", "add", "dev", "lowbw0", "parent", "1:b", "handle", "b:", "netem", "delay", "25000us",
                      "limit", "100000"]]


def test_kernel_links_under_torchrun_are_refused(tmp_path):
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    p = subprocess.run([sys.executable, "-m", "lowbw.train", *TINY, f"out_dir={tmp_path}/run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "net.backend=kernel puts the ranks lowbw's own launcher starts" in p.stdout + p.stderr


def test_the_kernel_backend_adds_no_emulation_on_top():
    assert _topology(2, backend="kernel").emulate is False
    assert _topology(2).emulate is True
