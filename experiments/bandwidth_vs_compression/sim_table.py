"""Tokens/s and J/token from the lowbw-simulate cross-check (sim_sweep/) as a Markdown table -> sim_table.md.

Simulator figures are modelled end to end (no training, no loss): compute = FLOPs / cpu_local's 51.2 GFLOP/s,
message bytes = float32 activations / the codec's estimated ratio, the same link model as lowbw-train.
"""
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
cells = {}
for f in (HERE / "sim_sweep").glob("*/summary.json"):
    s = json.loads(f.read_text())
    c = yaml.safe_load((f.parent / ".hydra" / "config.yaml").read_text())
    codec = f"{c['compress']['fwd']['name']}/{c['compress']['bwd']['name']}"
    cells[(c["net"]["uplink_mbps"], c["schedule"]["name"], codec)] = s
bws = sorted({k[0] for k in cells})
codecs = ["none/none", "int8/int8", "topk/int8"]
out = ["| Mbit/s | schedule | " + " | ".join(f"{c} tok/s" for c in codecs) + " | "
       + " | ".join(f"{c} J/token" for c in codecs) + " |", "|---|---|" + "---|" * (2 * len(codecs))]
for bw in bws:
    for sched in ("gpipe", "1f1b"):
        base = cells[(bw, sched, "none/none")]["tokens_per_s"]
        t = []
        for c in codecs:
            v = cells[(bw, sched, c)]["tokens_per_s"]
            t.append(f"{v:,.0f}" + ("" if c == "none/none" else f" ({v / base:.2f}×)"))
        e = [f"{cells[(bw, sched, c)]['energy']['j_per_token']:.4f}" for c in codecs]
        out.append(f"| {bw:g} | {sched} | " + " | ".join(t) + " | " + " | ".join(e) + " |")
(HERE / "sim_table.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
