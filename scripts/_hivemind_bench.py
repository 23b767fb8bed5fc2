"""Child of scripts/bench_codecs.py: times hivemind's codecs, run in the benchmark's own venv.

    <venv>/bin/python scripts/_hivemind_bench.py TENSORS.pt --reps 10 --threads 1

Not a benchmark to run by hand: ``bench_codecs.py --hivemind`` builds the venv (numpy<2, because
hivemind's 8-bit codecs raise a TypeError under numpy 2), saves its input tensors with torch.save,
runs this script in the venv and merges the JSON it prints (one object on the last line of stdout)
into its table. Timing is the parent's: one warm-up round, then the median over ``reps`` of
``compress`` (encode) and of ``extract`` (decode); ratio = raw bytes / len(serialized.buffer);
error = ‖x̂ − x‖/‖x‖ in float64. A codec that fails (BlockwiseQuantization needs bitsandbytes)
is reported with its error message instead of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# hivemind's Quantile8BitQuantization runs np.quantile on a thread pool of QUANTIZATION_THREADS
# (default 128) workers: one core, like every other row of the table.
os.environ.setdefault("QUANTIZATION_THREADS", "1")

import torch  # noqa: E402

CODECS = ["Uniform8BitQuantization", "Quantile8BitQuantization", "BlockwiseQuantization", "Float16Compression"]


def bench(codec, x: torch.Tensor, reps: int, info) -> dict:
    enc, dec, errs, sizes = [], [], [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        serialized = codec.compress(x, info, allow_inplace=False)
        t1 = time.perf_counter()
        y = codec.extract(serialized)
        t2 = time.perf_counter()
        if r:  # first round is warm-up
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            errs.append(float((y.double() - x.double()).norm() / x.double().norm()))
            sizes.append(len(serialized.buffer))
    raw = x.numel() * x.element_size()
    return {
        "enc_s": statistics.median(enc),
        "dec_s": statistics.median(dec),
        "ratio": raw / statistics.mean(sizes),
        "rel_err": statistics.mean(errs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tensors")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import warnings

    import hivemind
    import hivemind.compression as hc
    import numpy as np

    warnings.filterwarnings("ignore", category=UserWarning)  # torch.quantize_per_tensor deprecation
    inputs: dict[str, torch.Tensor] = torch.load(args.tensors)
    out = {"hivemind": hivemind.__version__, "numpy": np.__version__, "torch": torch.__version__, "rows": []}
    for name in CODECS:
        cls = getattr(hc, name, None)
        for kind, x in inputs.items():
            row = {"codec": name, "input": kind}
            try:
                if cls is None:
                    raise ImportError(f"hivemind {hivemind.__version__} has no {name}")
                row.update(bench(cls(), x.contiguous(), args.reps, hc.CompressionInfo.from_tensor(x)))
            except Exception as e:  # noqa: BLE001 -- reported as a row, the others still run
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            out["rows"].append(row)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
