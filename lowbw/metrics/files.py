"""Output files that are complete or absent: atomic replacement, line logs that never keep half a line,
JSON without NaN.

- :func:`atomic_write_text` / :func:`atomic_write_json` write a temporary file beside the target,
  flush it to disk and rename it over the target; if anything fails (a full disk, a folder that is not
  writable) the temporary file is removed and :class:`OutputError` names the file and the cause. The
  target is then either the old file, untouched, or the new one, whole.
- :class:`LineLog` appends lines with unbuffered writes, a batch of them (a step's events) in one write;
  a write that fails part-way is cut back to where the batch began, so the file stays valid line by
  line (``metrics.jsonl``, ``timeline.jsonl``).
- :func:`finite` replaces NaN and infinities by None: JSON has no such numbers, and a "NaN" in a file
  reads back as a number in Python but breaks every other JSON reader. ``json.dumps(..., allow_nan=False)``
  is used everywhere below so that one that slips through is an error, not a silent file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable


class OutputError(OSError):
    """An output file could not be written; the message names it and the cause."""


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (containers copied, other values kept)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text of ``obj`` with non-finite floats written as null."""
    try:  # nearly every object is finite: the copy that replaces non-finite floats is made only when one is not
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj), indent=indent, allow_nan=False)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step; on failure leave no temporary file and raise OutputError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a stop signal mid-write: no temporary file left behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(e.errno, f"could not write {path}: {_why(e)}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


class LineLog:
    """An append-only file of lines; each :meth:`append` or :meth:`extend` is written whole or not at all."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise OutputError(e.errno, f"could not open {self.path}: {_why(e)}") from None

    def append(self, line: str) -> None:
        self.extend((line,))

    def extend(self, lines: Iterable[str]) -> None:
        """Append ``lines`` in one write (rank 0 logs a step's ~100 events: one system call, not ~100)."""
        data = "".join(line + "\n" for line in lines).encode()
        if not data:
            return
        fd = self._f.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as e:
            try:
                os.ftruncate(fd, end)  # needs no free space: the file stays whole line by line
            except OSError:
                pass
            raise OutputError(e.errno, f"could not write {self.path}: {_why(e)}") from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` (one per line), atomically."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a line log, skipping lines that are not one (a line cut by a crash elsewhere)."""
    rows = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return rows
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows
