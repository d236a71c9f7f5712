#!/usr/bin/env python3
"""Summarise the layer-store benchmark: a plain-text table on stdout, JSON to a file.

    report_store.py RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv has the lazy benchmark's columns (metric run status wall_s bytes requests ranged
check note). Metrics: store (podman run through `imgfs store`, published indexes, empty
caches) and pull (podman pull, then podman run), each until the command's output; bytes are
what the registry sent through the counting relay. STATS.json is the distro layout's.
"""

import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402
from report_lazy_rows import load  # noqa: E402


def med(rows, key):
    vals = [r[key] for r in rows if r["status"] == "ok" and r[key] is not None]
    return statistics.median(vals) if vals else None


def main():
    raw_path, stats_path, out_path = sys.argv[1:4]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[4:])
    with open(stats_path) as f:
        image = json.load(f)
    rows = load(raw_path)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(ctx.pop("nproc", None)), "image": image, "context": ctx}
    compressed = image.get("compressed_bytes") or image.get("layers_compressed_bytes")
    for m in ("store", "pull"):
        r = rows.get(m, [])
        out[m] = {"runs": r, "median_s": med(r, "wall_s"), "median_bytes": med(r, "bytes"),
                  "failed": sum(1 for x in r if x["status"] != "ok")}
    s, p = out["store"]["median_s"], out["pull"]["median_s"]
    out["ratio"] = p / s if s and p else None
    if compressed and out["store"]["median_bytes"] is not None:
        out["store_share_of_image"] = out["store"]["median_bytes"] / compressed
    print(f"store: podman run through imgfs store vs podman pull + run ({ctx.get('workload', '')})")
    for m in ("store", "pull"):
        o = out[m]
        print(f"  {m:6} median {o['median_s']} s, {o['median_bytes']} bytes from the registry"
              f"{'' if not o['failed'] else ', FAILED runs: %d' % o['failed']}")
    if out["ratio"]:
        print(f"  ratio pull/store: {out['ratio']:.2f}x (goal >= 5x)")
    if out.get("store_share_of_image") is not None:
        print(f"  store fetched {100 * out['store_share_of_image']:.1f}% of the image's "
              f"{compressed} compressed bytes (goal < 10%)")
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
