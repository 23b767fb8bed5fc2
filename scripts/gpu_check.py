"""The GPU path, checked on a machine that has one (run through scripts/gpu_check.sh; installs nothing).

    bash scripts/gpu_check.sh                      # 2 stages on cuda vs the same run on the CPU
    bash scripts/gpu_check.sh --steps 50 --model small --hardware a100
    bash scripts/gpu_check.sh --device cpu         # the check's own machinery, on the CPU (no GPU needed)

1. Without a CUDA GPU (torch.cuda.is_available() false), it says so and exits 0.
2. It trains the same 2-stage pipeline twice with the same seed -- on ``cuda`` and on the CPU -- on the wall
   clock over free links (``net=ideal``: the device is all there is to time), and compares the training loss
   step by step and the validation loss: they must agree to ``--tolerance`` nats/token (float32 on both,
   PyTorch's default of no TF32 in matmuls).
3. It measures the GPU run's energy through Zeus (NVML's energy counter; ``energy.meter=zeus``) when Zeus is
   installed, and prints measured device J/token beside the modelled one (``hardware`` profile: busy and idle
   power times busy and idle time), and the step time of both runs.

Exit status: 0 when the check passed (or there is no GPU), 1 when the losses disagree or a run failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: GPU name (as torch reports it) -> the hardware profile in configs/hardware/ for the modelled figures.
PROFILES = {"T4": "t4", "A100": "a100", "H100": "h100", "RTX 4090": "rtx4090"}


def profile_for(gpu_name: str) -> str | None:
    return next((p for key, p in PROFILES.items() if key.lower() in gpu_name.lower()), None)


def train(device: str, out: Path, args: argparse.Namespace, meter: str) -> dict:
    """One lowbw-train run in a process of its own; returns its summary (raises when it failed)."""
    cmd = [sys.executable, "-m", "lowbw.train", f"device={device}", f"out_dir={out}", "pipeline.stages=2",
           f"model={args.model}", f"train.steps={args.steps}", f"train.eval_interval={args.steps}",
           f"seed={args.seed}", "clock=wall", "net=ideal", f"hardware={args.hardware}", f"energy.meter={meter}",
           "progress=false"]
    print(f"gpu_check: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    summary_path = out / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"the {device} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(summary_path.read_text())


def losses(run: Path) -> tuple[list[float], list[float]]:
    """(training loss per step, validation losses) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows], [r["val_loss"] for r in rows if r.get("val_loss") is not None]


def compare_losses(ref: Path, other: Path, tolerance: float) -> tuple[bool, str]:
    """Whether two runs' losses agree to ``tolerance`` nats/token, and a line saying by how much."""
    (a, va), (b, vb) = losses(ref), losses(other)
    if len(a) != len(b) or len(va) != len(vb):
        return False, f"losses: the runs differ in length ({len(a)} vs {len(b)} steps)"
    worst = max(abs(x - y) for x, y in zip(a + va, b + vb))
    ok = worst <= tolerance
    return ok, (f"losses: {'agree' if ok else 'DISAGREE'}: largest difference {worst:.2e} nats/token over {len(a)} "
                f"training steps and {len(va)} validation point(s) (tolerance {tolerance:g})")


def energy_lines(s: dict, n_gpus: int) -> list[str]:
    e = s.get("energy") or {}
    tokens = e.get("tokens") or 0
    modelled = e["device_j"] / tokens if tokens and e.get("device_j") is not None else None
    lines = [f"energy: modelled device {modelled:.4g} J/token (hardware profile: busy and idle power x busy and idle "
             f"time; compute {e.get('compute_j', 0):.4g} J + idle {e.get('idle_j', 0):.4g} J over {tokens} tokens)"
             if modelled is not None else "energy: no modelled figure (the run recorded no energy)"]
    measured = e.get("measured_j_per_token")
    if measured is not None:
        ratio = f", measured / modelled = {measured / modelled:.2f}" if modelled else ""
        meters = sorted({f"{n['meter']} {n['scope']}" for n in e.get("nodes", []) if n.get("measured_j") is not None})
        lines.append(f"energy: measured device {measured:.4g} J/token ({', '.join(meters)}){ratio}")
        if n_gpus < 2:
            lines.append("energy: note: both stages share one GPU, measured once; the model counts two devices")
    else:
        lines.append("energy: not measured (no energy counter read: Zeus not installed, or not an NVIDIA GPU; "
                     "pip install 'lowbw[energy]' for Zeus)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device of the checked run")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--model", default="tiny", help="model config (configs/model/)")
    ap.add_argument("--hardware", default=None, help="hardware profile for the modelled energy (default: from the "
                                                      "GPU's name; cpu_local for --device cpu)")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest loss difference allowed, nats/token")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    ap.add_argument("--keep", type=Path, default=None, help="keep both runs' folders here (default: removed)")
    args = ap.parse_args(argv)

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and n_gpus == 0:
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check.")
        return 0
    names = [torch.cuda.get_device_name(i) for i in range(n_gpus)]
    if args.device == "cuda":
        print(f"gpu_check: {n_gpus} GPU(s): {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.hardware is None:
        guess = profile_for(names[0]) if args.device == "cuda" else "cpu_local"
        args.hardware = guess or "a100"
        if guess is None:
            print(f"gpu_check: no hardware profile for {names[0]!r}: the modelled figures use a100 "
                  "(pass --hardware to choose)")
    meter = "zeus" if args.device == "cuda" and importlib.util.find_spec("zeus") is not None else "auto"

    root = args.keep or Path(tempfile.mkdtemp(prefix="lowbw-gpu-check-"))
    try:
        ref = train("cpu", root / "reference-cpu", args, "none")
        checked = train(args.device, root / f"checked-{args.device}", args, meter)
        ok, line = compare_losses(root / "reference-cpu", root / f"checked-{args.device}", args.tolerance)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"gpu_check: FAILED: {e}")
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(line)
    print(f"step time: {args.device} {checked['step_time_s']:.4g} s, CPU reference {ref['step_time_s']:.4g} s "
          f"(wall clock, mean over {checked['measured_steps']} steps after warm-up; {checked['tokens_per_s']:,.0f} vs "
          f"{ref['tokens_per_s']:,.0f} tokens/s)")
    for text in energy_lines(checked, n_gpus):
        print(text)
    print(f"gpu_check: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
