"""What lowbw-train does when things go wrong: one real run per fault, and a table of what happened.

    python scripts/fault_matrix.py [--out /tmp/fault_matrix] [--only crash,hang]

Each fault is injected into a small 3-stage run (tiny GPT, virtual clock unless the fault needs the
wall clock) started as ``python -m lowbw.train`` in a session of its own. For each, the table says:

- detected after: wall seconds from the fault to the first error line a rank prints (for faults set in
  the config -- crash, dead link, divergence -- from the moment the last step before it was recorded);
- stopped after: from the fault to the launcher's exit;
- blamed: the rank (or link) summary.json names as the cause;
- status and exit code: what summary.json and the process say;
- outputs complete: every JSON file parses, every JSON-lines file parses line by line, no temporary
  file is left (lowbw.testing.processes.outputs_complete);
- left: processes of the run still alive 10 s after the launcher exited.

Disk full needs root (a 4 MB tmpfs is mounted and filled); without it that row says why it was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbw.testing.processes import (alive, descendants, outputs_complete, rank_pids,  # noqa: E402
                                     start_train, stop_all, wait_for_steps)

BASE = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=3",
        "train.eval_batches=1", "progress=false", "net=ideal", "clock=virtual", "timeout_s=10"]
ENDLESS = ["train.steps=1000000"]


class Watch:
    """A started run: its stderr read line by line with the wall time of each line."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = start_train(args, cwd)
        self.lines: list[tuple[float, str]] = []
        self.pids: set[int] = set()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep stdout drained

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.time(), line.rstrip()))  # wall time: compared with file times

    def first_error_after(self, t0: float) -> float | None:
        for t, line in self.lines:
            if t >= t0 - 0.5 and line.startswith("lowbw: rank") and "crashing" not in line:
                return t - t0
        return None

    def finish(self, timeout_s: float = 300) -> tuple[int, float]:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_all(self.proc, self.pids)
        end = time.time()
        self._t.join(5)
        deadline = time.monotonic() + 10
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.proc.returncode, end


def row(name: str, run_dir: Path, w: Watch, t_fault: float, code: int, end: float) -> dict:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = {}
    blamed = s.get("failed_link") or s.get("failed_rank")
    if s.get("status") == "diverged":
        blamed = f"step {s.get('diverged_step')}"
    bad = outputs_complete(run_dir) if run_dir.exists() else []
    detected = w.first_error_after(t_fault)
    return {"fault": name, "detected_s": detected, "stopped_s": end - t_fault,
            "blamed": "-" if blamed is None else f"rank {blamed}" if isinstance(blamed, int)
            else blamed if blamed.startswith("step") else f"link {blamed}",
            "status": s.get("status", "(no summary.json)"), "exit": code, "complete": "yes" if not bad else bad[0],
            "left": len(alive(w.pids))}


def signal_fault(name: str, sig: int, group: bool, root: Path) -> dict:
    run_dir = root / name
    w = Watch(BASE + ENDLESS + [f"out_dir={run_dir}"], root)
    wait_for_steps(run_dir, 3, w.proc)
    w.pids = descendants(w.proc.pid)
    t = time.time()
    os.killpg(w.proc.pid, sig) if group else w.proc.send_signal(sig)
    code, end = w.finish()
    return row(name, run_dir, w, t, code, end)


def hang(root: Path) -> dict:
    run_dir = root / "hang"
    w = Watch(BASE + ENDLESS + [f"out_dir={run_dir}"], root)
    wait_for_steps(run_dir, 3, w.proc)
    w.pids = descendants(w.proc.pid)
    ranks = rank_pids(w.proc.pid)
    t = time.time()
    os.kill(ranks[1], signal.SIGSTOP)  # ranks are spawned in order: the second is rank 1
    code, end = w.finish()
    return row("hang (SIGSTOP rank 1)", run_dir, w, t, code, end)


def configured(name: str, extra: list[str], root: Path) -> dict:
    """A fault the config sets up (crash, dead link, divergence): timed from the last step recorded."""
    run_dir = root / name.split()[0]
    started = time.time()
    w = Watch(BASE + extra + [f"out_dir={run_dir}"], root)
    while w.proc.poll() is None and not w.pids:  # the ranks, to check none is left
        time.sleep(0.5)
        w.pids = set(rank_pids(w.proc.pid))
    code, end = w.finish()
    metrics = run_dir / "metrics.jsonl"
    t = metrics.stat().st_mtime if metrics.exists() else started  # when the last step before it was recorded
    return row(name, run_dir, w, t, code, end)


def disk_full(root: Path) -> dict:
    if os.geteuid() != 0:
        return {"fault": "disk full", "skipped": "needs root to mount a small tmpfs"}
    mnt = root / "disk"
    mnt.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
        return {"fault": "disk full", "skipped": "mount -t tmpfs failed"}
    try:
        run_dir = mnt / "run"
        w = Watch(BASE + ENDLESS + [f"out_dir={run_dir}"], root)
        wait_for_steps(run_dir, 3, w.proc)
        w.pids = descendants(w.proc.pid)
        t = time.time()
        with open(mnt / "ballast", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        code, end = w.finish()
        r = row("disk full (mid-run)", run_dir, w, t, code, end)
        r["detected_s"] = w.first_error_after(t)
        return r
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def changed_resume(root: Path) -> dict:
    run_dir = root / "resume"
    done = subprocess.run([sys.executable, "-m", "lowbw.train", *BASE, "train.steps=2", "checkpoint.every=1",
                           f"out_dir={run_dir}"], cwd=root, capture_output=True, text=True)
    before = _files(run_dir)
    w = Watch(BASE + ["train.steps=4", "checkpoint.every=1", "resume=true", "model.n_embd=64",
                      f"out_dir={run_dir}"], root)
    t = time.time()
    code, end = w.finish()
    after = _files(run_dir)
    hydra = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p) and ".hydra" in p.parts}
    message = next((line for _, line in w.lines if "configuration error" in line), "")
    return {"fault": "resume with model.n_embd changed", "detected_s": None, "stopped_s": end - t,
            "blamed": "model.n_embd=32 (now 64)" if "model.n_embd=32 (now 64)" in message else message[:60],
            "status": json.loads((run_dir / "summary.json").read_text())["status"] + " (kept)",
            "exit": code, "complete": _unchanged(before, after, hydra) if done.returncode == 0 else "first run failed",
            "left": 0}


def _files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _unchanged(before: dict, after: dict, hydra: set) -> str:
    """Whether the refused resume left the finished run's files as they were. Hydra writes its own record
    of every launch (.hydra/) into the run folder before lowbw starts, and the launch's log lines go to the
    end of train.log (the run's log, lowbw.logs): said apart, the log only if what it held is kept whole."""
    ours = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)} - hydra
    logs = {p for p in ours if p.name == "train.log" and p in before and after.get(p, b"").startswith(before[p])}
    ours -= logs
    if ours:
        return "CHANGED: " + ", ".join(sorted(p.name for p in ours))
    also = [*(["Hydra rewrote .hydra/"] if hydra else []), *(["the refusal appended to train.log"] if logs else [])]
    return "yes, unchanged" + (f" ({'; '.join(also)})" if also else "")


FAULTS = {
    "crash": lambda root: configured("crash (rank 1 exits at step 3)", ENDLESS + ["faults.crash_rank=1",
                                                                                  "faults.crash_step=3"], root),
    "hang": hang,
    "sigterm": lambda root: signal_fault("SIGTERM to the launcher", signal.SIGTERM, False, root),
    "sigint": lambda root: signal_fault("SIGINT to the process group", signal.SIGINT, True, root),
    "deadlink": lambda root: configured("dead link (0->1 down on the wall clock)", ENDLESS + [
        "clock=wall", "faults.outages=[{link: '0->1', start_s: 2.0, end_s: 100000.0}]"], root),
    "diskfull": disk_full,
    "divergence": lambda root: configured("divergence (train.lr=1e30)", ["train.steps=20", "train.lr=1e30"], root),
    "resume": changed_resume,
}


def fmt(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['fault']} | skipped: {r['skipped']} | | | | | | |"
    d = "-" if r["detected_s"] is None else f"{r['detected_s']:.1f}"
    return (f"| {r['fault']} | {d} | {r['stopped_s']:.1f} | {r['blamed']} | {r['status']} | {r['exit']} | "
            f"{r['complete']} | {r['left']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lowbw_fault_matrix"))
    ap.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    a = ap.parse_args()
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    t0 = time.monotonic()
    print("| fault | detected after (s) | stopped after (s) | blamed | status | exit code | outputs complete | "
          "processes left |")
    print("|---|---:|---:|---|---|---:|---|---:|")
    for name in a.only.split(","):
        print(fmt(FAULTS[name](a.out)), flush=True)
    print(f"\n{time.monotonic() - t0:.0f} s of wall time; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; timeout_s=10")


if __name__ == "__main__":
    main()
