"""Watching real runs from outside, for the fault tests and scripts/fault_matrix.py (Linux: reads /proc).

- :func:`start_train`: ``python -m lowbw.train`` (or torchrun) in a session of its own, so that a test can
  signal the launcher alone or its whole process group.
- :func:`descendants`: every process below a pid (ranks, multiprocessing's resource tracker, ...), to
  check that none is left once the run has ended.
- :func:`rank_pids`: the ranks among them, in rank order.
- :func:`wait_for_steps`: block until a run folder's metrics.jsonl holds some steps.
- :func:`listening_sockets`: the TCP addresses the given processes listen on.
- :func:`outputs_complete`: every file of a run folder is whole (JSON parses, JSON lines parse line by
  line, no temporary file left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def start_train(args: list[str], cwd: Path, torchrun: Optional[list[str]] = None) -> subprocess.Popen:
    prefix = [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m"] if torchrun else [sys.executable, "-m"]
    return subprocess.Popen([*prefix, "lowbw.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":  # zombies are gone already, only not yet reaped
            out[int(d.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_pids(launcher: int) -> list[int]:
    """The rank processes below a launcher, in start order (rank order): the fork server's children (the
    launcher's way where there is a fork server), or spawned interpreters."""
    parents = _parents()
    below = descendants(launcher)
    servers = {p for p in below if "multiprocessing.forkserver" in _cmdline(p)}
    return sorted(p for p in below if parents.get(p) in servers or "spawn_main" in _cmdline(p))


def alive(pids: set[int]) -> set[int]:
    parents = _parents()
    return {p for p in pids if p in parents}


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len((run_dir / "metrics.jsonl").read_text().splitlines()) >= n:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited with {proc.returncode} before {n} steps: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} holds fewer than {n} steps after {timeout_s} s")


def stop_all(proc: subprocess.Popen, pids: set[int]) -> None:
    """Last resort after a test: kill what is left of a run (its session and the given pids)."""
    for p in alive(pids | {proc.pid}):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _addr(hex_addr: str) -> str:
    ip, port = hex_addr.split(":")
    if len(ip) == 8:
        host = ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0))
    else:  # IPv6: four little-endian 32-bit words
        words = [ip[i:i + 8] for i in range(0, 32, 8)]
        raw = "".join("".join(w[j:j + 2] for j in (6, 4, 2, 0)) for w in words)
        host = ":".join(raw[i:i + 4] for i in range(0, 32, 4))
    return f"{host}:{int(port, 16)}"


def listening_sockets(pids: set[int]) -> list[str]:
    """host:port of every listening TCP socket (IPv4 and IPv6) held by one of ``pids``."""
    inodes = set().union(*(_socket_inodes(p) for p in pids)) if pids else set()
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                found.append(_addr(f[1]))
    return found


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("0000:0000:0000:0000:0000:0000:0000:0001",)


def _no_nan(token: str) -> float:
    raise ValueError(f"{token} is not a JSON number")


def outputs_complete(run_dir: Path) -> list[str]:
    """What is not whole in a run folder: unparsable JSON, a JSON-lines file with a bad line, a
    temporary file left behind. Empty when every file is complete."""
    bad = []
    for f in run_dir.rglob("*"):
        if not f.is_file():
            continue
        if f.name.endswith(".tmp"):
            bad.append(f"{f}: temporary file left")
        elif f.suffix == ".json":
            try:
                json.loads(f.read_text(), parse_constant=_no_nan)
            except ValueError as e:
                bad.append(f"{f}: not complete JSON ({e})")
        elif f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text().splitlines()):
                try:
                    json.loads(line, parse_constant=_no_nan)
                except ValueError as e:
                    bad.append(f"{f} line {i + 1}: {e}")
                    break
    return bad
