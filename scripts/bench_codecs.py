#!/usr/bin/env python
"""Benchmark the built-in codecs on activation-shaped tensors, one core, beside hivemind's.

    python scripts/bench_codecs.py [--shape 8 128 512] [--reps 10] [--rounds 1] [--threads 1] [--no-hivemind]

For each codec: encode and decode time (median over reps, ms; with ``--rounds N`` the median over N
rounds of those medians, hivemind's child and lowbw's codecs taking turns each round), throughput
(GB/s of raw input through encode+decode), compression ratio (raw bytes / payload bytes) and relative error
‖x̂ − x‖/‖x‖, on a random normal tensor and on a realistic activation (output of a
TransformerEncoderLayer, with two outlier channels). ``none`` is the reference row. Stateful codecs
run as a sender/receiver pair, message after message; ``aqsgd`` is measured in its steady state
(every sample seen once before, the activations drifting by 1 %).

Side by side, on the same tensors and in the same table: the matching codecs of hivemind
(``hivemind.compression``: Uniform8BitQuantization, Quantile8BitQuantization, BlockwiseQuantization
when it works, Float16Compression), timed the same way (compress = encode, extract = decode; ratio =
raw bytes / len(serialized.buffer)). hivemind's 8-bit codecs raise a TypeError under numpy 2, so
they run in a virtual environment of their own: on first use the script creates it
(``--hivemind-venv``, default ~/.cache/lowbw/bench-hivemind-venv) with ``python -m venv
--system-site-packages`` -- this interpreter's torch is reused, never downloaded -- and installs
``numpy<2`` and ``hivemind==1.1.12`` into it (numpy<2 inside the venv shadows the system numpy),
then reuses it. The tensors go to the child (scripts/_hivemind_bench.py) through torch.save; it
prints JSON that is merged here. hivemind is not a dependency of lowbw. If the venv cannot be built
(no network, an install failure), one line says why and only lowbw's rows are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from lowbw.compress import build_codec

CODECS = [
    {"name": "none"},
    {"name": "fp16"},
    {"name": "bf16"},
    {"name": "int8"},
    {"name": "int8", "block": 0},
    {"name": "int4"},
    {"name": "int2"},
    {"name": "topk", "ratio": 0.05},
    {"name": "topk", "ratio": 0.05, "error_feedback": False},
    {"name": "randk", "ratio": 0.05},
    {"name": "powersgd", "rank": 8},
    {"name": "aqsgd"},
]


def label(spec: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f"({extra})" if extra else "")


def activations(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    d = shape[-1]
    layer = torch.nn.TransformerEncoderLayer(d, nhead=8, dim_feedforward=4 * d, batch_first=True)
    with torch.no_grad():
        y = layer(torch.randn(shape))
    y[..., :2] *= 20.0
    return y.contiguous()


def bench(spec: dict, x: torch.Tensor, reps: int) -> tuple[float, float, float, float]:
    snd, rcv = build_codec(spec), build_codec(spec)
    ids = torch.arange(x.shape[0]) if spec["name"] == "aqsgd" else None
    g = torch.Generator().manual_seed(1)
    if ids is not None:  # first epoch: fill both caches
        rcv.decode(snd.encode(x, ids), ids)
    enc, dec, errs, sizes = [], [], [], []
    for r in range(reps + 1):
        xr = x + 0.01 * x.std() * torch.randn(x.shape, generator=g) if ids is not None else x
        t0 = time.perf_counter()
        payload = snd.encode(xr, ids)
        t1 = time.perf_counter()
        y = rcv.decode(payload, ids)
        t2 = time.perf_counter()
        if r:  # first round is warm-up
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            errs.append(float((y.double() - xr.double()).norm() / xr.double().norm()))
            sizes.append(payload.numel())
    raw = x.numel() * x.element_size()
    return statistics.median(enc), statistics.median(dec), raw / statistics.mean(sizes), statistics.mean(errs)


HIVEMIND_VERSION = "1.1.12"
HIVEMIND_CHILD = Path(__file__).resolve().with_name("_hivemind_bench.py")
#: hivemind codec -> the lowbw row it is compared with in the closing summary
HIVEMIND_MATCH = {"Uniform8BitQuantization": "int8", "Quantile8BitQuantization": "int8",
                  "BlockwiseQuantization": "int8", "Float16Compression": "fp16"}


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lowbw" / "bench-hivemind-venv"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The most telling line of a failed command's output."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR") or "Error" in ln]
    return (errs or lines or [f"exit code {proc.returncode}"])[-1][:300]


def ensure_hivemind_venv(venv: Path) -> tuple[Optional[Path], str]:
    """(python of a ready venv, "") or (None, why not). Builds the venv once, then reuses it."""
    torch_version = torch.__version__.split("+")[0]
    reqs = ["numpy<2", f"hivemind=={HIVEMIND_VERSION}", f"torch=={torch_version}"]
    stamp = {"reqs": reqs, "torch": torch.__version__, "base": sys.executable}
    marker = venv / ".lowbw-bench-ready.json"
    py = _venv_python(venv)
    try:
        if py.exists() and marker.exists() and json.loads(marker.read_text()) == stamp:
            return py, ""
    except (OSError, ValueError):
        pass
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists():
            return None, f"{venv} exists and is not a virtual environment; pass another --hivemind-venv"
        shutil.rmtree(venv)  # an incomplete or outdated build of ours
    print(f"[hivemind] building {venv} (once, a few minutes): {' '.join(reqs)}", file=sys.stderr, flush=True)
    try:
        # --system-site-packages: this interpreter's torch is seen, so pip never downloads one
        # (plain `pip install torch` could fetch a multi-GB CUDA build); numpy<2 installed inside
        # the venv comes first on its sys.path and shadows the system's numpy 2.
        p = _run([sys.executable, "-m", "venv", "--system-site-packages", venv], 300)
        if p.returncode:
            return None, f"python -m venv failed: {_why(p)}"
        # If this interpreter is itself a venv, its site-packages (with torch) are not the base
        # interpreter's: point the new venv at the directory torch was imported from.
        torch_site = Path(torch.__file__).resolve().parent.parent
        probe = "import sys, torch; print(torch.__version__)"
        p = _run([py, "-c", probe], 120)
        if p.returncode or p.stdout.strip() != torch.__version__:
            site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip())
            (site / "_lowbw_parent_torch.pth").write_text(f"{torch_site}\n")
            p = _run([py, "-c", probe], 120)
            if p.returncode or p.stdout.strip() != torch.__version__:
                return None, (f"the venv does not see torch {torch.__version__} from {torch_site} "
                              f"({_why(p)}); not downloading one")
        p = _run([py, "-m", "pip", "install", "--disable-pip-version-check", "--timeout", "30",
                  "--retries", "2", *reqs], 1800)
        if p.returncode:
            return None, f"pip install {' '.join(reqs)} failed: {_why(p)}"
        check = ("import numpy, torch, hivemind.compression; "
                 f"assert numpy.__version__ < '2', numpy.__version__; "
                 f"assert torch.__version__ == {torch.__version__!r}, torch.__version__")
        p = _run([py, "-c", check], 300)
        if p.returncode:
            return None, f"hivemind does not import in the venv: {_why(p)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    marker.write_text(json.dumps(stamp))
    return py, ""


def run_hivemind(py: Path, inputs: dict, reps: int, threads: int) -> tuple[Optional[dict], str]:
    """hivemind's rows from the child script run in the venv, or (None, why not)."""
    with tempfile.TemporaryDirectory(prefix="lowbw-bench-") as tmp:
        path = Path(tmp) / "tensors.pt"
        torch.save(inputs, path)
        try:
            p = _run([py, HIVEMIND_CHILD, path, "--reps", reps, "--threads", threads], 1800)
        except subprocess.TimeoutExpired:
            return None, "the hivemind child script timed out"
    if p.returncode:
        return None, f"the hivemind child script failed: {_why(p)}"
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"the hivemind child script printed no JSON: {p.stdout[-200:]!r}"


def _median_rows(rounds: list[list[dict]]) -> list[dict]:
    """hivemind's rows, each timing the median over rounds of that round's median."""
    rows = []
    for i, row in enumerate(rounds[0]):
        row = dict(row)
        if "error" not in row:
            for key in ("enc_s", "dec_s"):
                row[key] = statistics.median(r[i][key] for r in rounds)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[8, 128, 512])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure everything this many times, hivemind's child then lowbw's codecs each round, "
                         "and print per row the median over rounds of each round's median time: on a shared "
                         "machine, load that comes and goes then hits both sides alike (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hivemind", action=argparse.BooleanOptionalAction, default=True,
                    help="also run hivemind's codecs in a venv of their own (default: on, if it can be set up)")
    ap.add_argument("--hivemind-venv", type=Path, default=default_venv(),
                    help="where that venv is built once and reused (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    inputs = {
        "random": torch.randn(shape, generator=torch.Generator().manual_seed(0)),
        "activation": activations(shape),
    }
    raw = inputs["random"].numel() * 4
    py, hm, hm_why = None, None, "skipped (--no-hivemind)"
    if args.hivemind:  # first, so that its set-up messages do not split the table
        py, hm_why = ensure_hivemind_venv(args.hivemind_venv.expanduser())
    hm_rounds: list[list[dict]] = []
    ours: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for _ in range(args.rounds):
        if py is not None:
            hm, hm_why = run_hivemind(py, inputs, args.reps, args.threads)
            if hm is None:
                py = None
            else:
                hm_rounds.append(hm["rows"])
        for spec in CODECS:
            for kind, x in inputs.items():
                ours.setdefault((label(spec), kind), []).append(bench(spec, x, args.reps))
    if py is not None and hm_rounds:
        hm["rows"] = _median_rows(hm_rounds)
    else:
        hm = None
    print(f"shape {list(shape)} float32 ({raw / 2**20:.1f} MiB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), median of {args.reps}"
          + (f", then the median of {args.rounds} rounds" if args.rounds > 1 else ""))
    if hm is not None:
        print(f"hivemind {hm['hivemind']} (numpy {hm['numpy']}, torch {hm['torch']}) in {args.hivemind_venv}")
    else:
        print(f"hivemind rows left out: {hm_why}")
    results: dict[tuple[str, str], tuple[float, float]] = {}  # (codec, input) -> (GB/s, rel err)
    header = f"{'codec':<38} {'input':<10} {'enc ms':>8} {'dec ms':>8} {'GB/s':>7} {'ratio':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    for (lab, kind), runs in ours.items():
        e, d = (statistics.median(r[i] for r in runs) for i in (0, 1))
        _, _, ratio, err = runs[0]  # the same in every round: the same tensors, the same codec
        gbs = raw / (e + d) / 1e9
        results[lab, kind] = (gbs, err)
        print(f"{lab:<38} {kind:<10} {e * 1e3:8.2f} {d * 1e3:8.2f} {gbs:7.2f} {ratio:8.2f} {err:9.2e}")
    failed: dict[str, str] = {}
    for row in hm["rows"] if hm else []:
        name = "hivemind " + row["codec"]
        if "error" in row:
            failed.setdefault(name, row["error"])
            continue
        e, d = row["enc_s"], row["dec_s"]
        gbs = raw / (e + d) / 1e9
        results[name, row["input"]] = (gbs, row["rel_err"])
        print(f"{name:<38} {row['input']:<10} {e * 1e3:8.2f} {d * 1e3:8.2f} {gbs:7.2f} "
              f"{row['ratio']:8.2f} {row['rel_err']:9.2e}")
    for name, why in failed.items():
        print(f"{name:<38} {'(fails)':<10} {why}")
    print("topk/randk with error feedback: the same tensor is sent again and again, so each x̂ carries the\n"
          "residual of the earlier sends -- their error against one x exceeds 1 by design; the sum over\n"
          "sends is what tracks the inputs (tests/test_codecs.py). GB/s = raw bytes / (encode + decode).")
    if hm is not None:
        print("lowbw against hivemind (same tensors, one thread):")
        for name, mine in HIVEMIND_MATCH.items():
            for kind in inputs:
                if (f"hivemind {name}", kind) not in results:
                    continue
                theirs_gbs, theirs_err = results[f"hivemind {name}", kind]
                for lab in ([mine, "int8(block=0)"] if mine == "int8" else [mine]):
                    gbs, err = results[lab, kind]
                    verdict = "at least as fast at no worse error" if gbs >= theirs_gbs and err <= theirs_err \
                        else "NOT at least as fast at no worse error"
                    print(f"  {kind:<10} {lab:<14} {gbs:6.2f} GB/s {err:8.2e}  vs {name:<25} {theirs_gbs:6.2f} GB/s "
                          f"{theirs_err:8.2e}: {gbs / theirs_gbs:5.1f}x the speed, {verdict}")


if __name__ == "__main__":
    main()
