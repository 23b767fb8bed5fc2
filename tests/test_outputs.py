"""Every output file is complete or absent, no NaN goes into JSON, a failure to write is a failure.

Unit checks of lowbw.metrics.files, then real runs on a small tmpfs that fills up mid-run and at the
end (mounting one needs root; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbw.metrics import files
from lowbw.metrics.files import LineLog, OutputError, atomic_write_json, dumps, read_json_lines
from lowbw.metrics.recorder import Recorder
from lowbw.metrics.timeline import Event
from lowbw.testing.processes import alive, descendants, outputs_complete, start_train, stop_all, wait_for_steps

RUN = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
       "train.eval_batches=1", "progress=false", "net=ideal", "clock=virtual", "clock.durations=fixed"]


def test_json_never_holds_nan_or_infinity():
    text = dumps({"loss": math.nan, "rows": [1.0, math.inf, -math.inf], "ok": 2.5})
    assert json.loads(text) == {"loss": None, "rows": [1.0, None, None], "ok": 2.5}
    assert "NaN" not in text and "Infinity" not in text


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"status": "completed"})
    (tmp_path / ".summary.json.tmp").mkdir()  # the temporary name cannot be opened as a file
    with pytest.raises(OutputError, match=f"could not write {target}"):
        atomic_write_json(target, {"status": "failed"})
    assert json.loads(target.read_text()) == {"status": "completed"}


def test_a_line_log_reads_back_whole_lines_only(tmp_path):
    log = LineLog(tmp_path / "m.jsonl")
    log.append(dumps({"step": 0}))
    log.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 1, "lo')  # a line cut by a crash of an older writer
    assert read_json_lines(tmp_path / "m.jsonl") == [{"step": 0}]


# ---- a write that fails half-way (a full disk, simulated: needs no root) -------------------------------


class HalfWriter(io.FileIO):
    """A file whose writes keep the first half of what they are given, then fail as a full disk does."""

    def write(self, data) -> int:
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_for(monkeypatch, name: str) -> None:
    """Make lowbw.metrics.files' writes to files called ``.<name>.tmp`` fail half-way with ENOSPC."""
    real_open = open

    def fake_open(path, mode="r", *a, **k):
        if Path(path).name == f".{name}.tmp" and "w" in mode:
            return HalfWriter(path, "w")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(files, "open", fake_open, raising=False)


def test_a_write_that_fails_half_way_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"status": "completed", "steps": 3})
    disk_full_for(monkeypatch, "summary.json")
    with pytest.raises(OutputError, match=f"could not write {target}: No space left on device"):
        atomic_write_json(target, {"status": "failed", "steps": 4})
    assert json.loads(target.read_text()) == {"status": "completed", "steps": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def writes_fail_half_way(monkeypatch) -> None:
    """Make every os.write keep the first half of its data, then fail as a full disk does."""
    real_write = os.write

    def half_write(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_write)


def test_a_line_that_fails_half_way_is_cut_back_to_the_last_whole_line(tmp_path, monkeypatch):
    log = LineLog(tmp_path / "metrics.jsonl")
    log.append(dumps({"step": 0, "loss": 1.5}))
    writes_fail_half_way(monkeypatch)
    with pytest.raises(OutputError, match="could not write .*metrics.jsonl: No space left on device"):
        log.append(dumps({"step": 1, "loss": 1.25}))
    monkeypatch.undo()
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "loss": 1.5}\n'


def test_a_batch_of_lines_that_fails_half_way_leaves_none_of_the_batch(tmp_path, monkeypatch):
    log = LineLog(tmp_path / "timeline.jsonl")
    log.extend(dumps({"step": 0, "i": i}) for i in range(3))
    writes_fail_half_way(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device"):
        log.extend(dumps({"step": 1, "i": i}) for i in range(3))
    monkeypatch.undo()
    log.close()
    assert read_json_lines(tmp_path / "timeline.jsonl") == [{"step": 0, "i": i} for i in range(3)]
    assert (tmp_path / "timeline.jsonl").read_text().endswith("\n")


def _recorded_run(run_dir: Path, steps: int = 3) -> Recorder:
    rec = Recorder(run_dir, "virtual", world=2, tokens_per_step=64, steps=steps, warmup_steps=0, progress=False,
                   meta={})
    for step in range(steps):
        events = [Event(rank=r, kind="forward", start=step + 0.1 * r, end=step + 0.1 * r + 0.05, step=step)
                  for r in range(2)]
        reports = [{"rank": r, "busy": 0.05, "end": step + 0.2, "bytes_sent": {str(1 - r): 100},
                    "n_loss": r, "loss_sum": 2.0 * r, "events": events if r == 0 else []} for r in range(2)]
        rec.log_step(step, reports)
    return rec


@pytest.mark.parametrize("name", ["trace.json", "timeline.png"])
def test_a_picture_that_cannot_be_written_at_the_end_fails_the_run_and_is_absent(tmp_path, monkeypatch, name):
    rec = _recorded_run(tmp_path / "run")
    disk_full_for(monkeypatch, name)
    summary = rec.finish("completed")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(dumps(summary))
    assert on_disk["status"] == "failed" and f"could not write {tmp_path / 'run' / name}" in on_disk["error"]
    assert on_disk["steps_completed"] == 3 and on_disk["last_step"] == 2  # the training itself is recorded
    assert not (tmp_path / "run" / name).exists() and outputs_complete(tmp_path / "run") == []


def test_a_summary_that_cannot_be_written_is_an_error_not_a_cut_file(tmp_path, monkeypatch):
    rec = _recorded_run(tmp_path / "run")
    disk_full_for(monkeypatch, "summary.json")
    with pytest.raises(OutputError, match="summary.json: No space left on device"):
        rec.finish("completed")
    assert not (tmp_path / "run" / "summary.json").exists() and outputs_complete(tmp_path / "run") == []


# ---- a small disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave_bytes: int = 0) -> None:
    """Fill ``disk`` with a ballast file until at most ``leave_bytes`` are free."""
    free = shutil.disk_usage(disk).free - leave_bytes
    try:
        with open(disk / "ballast", "wb") as f:
            while free > 0:
                n = min(free, 1 << 16)
                f.write(b"\0" * n)
                f.flush()
                free -= n
    except OSError:  # full already (a running run can fill the last pages first): as asked
        pass


def _check_failed_cleanly(run_dir: Path, proc, err: str) -> None:
    assert proc.returncode == 1, err[-3000:]
    assert "No space left on device" in err and "Traceback" not in err
    assert outputs_complete(run_dir) == []  # whole or absent: no half line, no cut JSON, no .tmp
    rows = read_json_lines(run_dir / "metrics.jsonl")
    assert len(rows) >= 3 and [r["step"] for r in rows] == list(range(len(rows)))
    if (run_dir / "summary.json").exists():
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_a_disk_that_fills_up_mid_run_fails_the_run_with_whole_files_and_a_sentence(small_disk):
    run_dir = small_disk / "run"
    proc = start_train(RUN + ["train.steps=1000000", f"out_dir={run_dir}"], small_disk.parent)
    pids: set[int] = set()
    try:
        wait_for_steps(run_dir, 3, proc)
        pids = descendants(proc.pid)
        fill(small_disk)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_all(proc, pids)
    _check_failed_cleanly(run_dir, proc, err)
    deadline = time.monotonic() + 10  # the fork server exits once it sees the launcher gone, a moment later
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "could not write" in err and alive(pids) == set()


def test_a_disk_that_fills_up_at_the_end_fails_the_run_instead_of_cutting_its_files(small_disk, tmp_path):
    # The same run twice: first with room, to learn what its files take; then with room for everything
    # but the timeline pictures, which are written last (trace.json, timeline.png).
    args = RUN + ["train.steps=3"]
    first = subprocess.run([sys.executable, "-m", "lowbw.train", *args, f"out_dir={small_disk}/a"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    pages = lambda p: -(-p.stat().st_size // 4096) * 4096  # noqa: E731  tmpfs allocates whole pages
    files = [p for p in (small_disk / "a").rglob("*") if p.is_file()]
    pictures = sum(pages(p) for p in files if p.name in ("trace.json", "timeline.png"))
    needed = sum(pages(p) for p in files if p.name not in ("trace.json", "timeline.png"))
    shutil.rmtree(small_disk / "a")
    fill(small_disk, leave_bytes=needed + 4 * 4096 + pictures // 4)  # a little slack, far from the pictures
    proc = subprocess.run([sys.executable, "-m", "lowbw.train", *args, f"out_dir={small_disk}/b"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    run_dir = small_disk / "b"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert outputs_complete(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert summary["steps_completed"] == 3  # the training itself is recorded
    assert "Traceback" not in proc.stderr
