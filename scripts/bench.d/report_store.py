#!/usr/bin/env python3
"""Summarise the layer-store and snapshotter benchmarks: a plain-text table on stdout, JSON
to a file.

    report_store.py RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv has the lazy benchmark's columns (metric run status wall_s bytes requests ranged
check note). Metrics: store@SPAN (podman run through `imgfs store`, indexes published with
that span size, empty caches), artifact@SPAN (the published artifact: bytes) and pull
(podman pull, then podman run), each until the command's output; bytes are what the
registry sent through the counting relay. STATS.json is the distro layout's. With
lazy=snapshotter the lazy metrics are snapshotter@SPAN (containerd through `imgfs
snapshotter`), the peer (pull) is containerd's own pull, and the check column holds the
snapshotter's peak RSS (KiB).
"""

import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402
from report_lazy_rows import load  # noqa: E402


def size(text):
    """Bytes in a size like 512KiB or 4MiB."""
    for unit, mult in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)):
        if text.endswith(unit):
            return float(text[:-3]) * mult
    return float(text)


def med(rows, key):
    vals = [r[key] for r in rows if r["status"] == "ok" and r[key] is not None]
    return statistics.median(vals) if vals else None


def main():
    raw_path, stats_path, out_path = sys.argv[1:4]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[4:])
    with open(stats_path) as f:
        image = json.load(f)
    lazy = ctx.pop("lazy", "store")
    peer = ctx.pop("peer", "podman pull + run")
    rows = load(raw_path)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(ctx.pop("nproc", None)), "image": image, "context": ctx}
    compressed = image.get("compressed_bytes") or image.get("layers_compressed_bytes")
    stores = sorted((m for m in rows if m.startswith(lazy + "@")),
                    key=lambda m: size(m.split("@", 1)[1]))
    for m in stores + ["pull"]:
        r = rows.get(m, [])
        out[m] = {"runs": r, "median_s": med(r, "wall_s"), "median_bytes": med(r, "bytes"),
                  "failed": sum(1 for x in r if x["status"] != "ok")}
        art = rows.get("artifact@" + m.split("@", 1)[-1], [])
        if m != "pull" and art:
            out[m]["artifact_bytes"] = art[0]["bytes"]
    p = out["pull"]["median_s"]
    print(f"{lazy}: through imgfs {lazy} vs {peer} ({ctx.get('workload', '')})")
    for m in stores + ["pull"]:
        o = out[m]
        s = o["median_s"]
        if m != "pull":
            o["ratio"] = p / s if s and p else None
            if compressed and o["median_bytes"] is not None:
                o["share_of_image"] = o["median_bytes"] / compressed
        print(f"  {m:20} median {o['median_s']} s, {o['median_bytes']} bytes from the registry"
              f"{'' if not o['failed'] else ', FAILED runs: %d' % o['failed']}")
        if o.get("artifact_bytes") is not None:
            print(f"    index artifact {o['artifact_bytes']} bytes")
        if o.get("ratio"):
            print(f"    ratio pull/{lazy}: {o['ratio']:.2f}x (goal >= 5x)")
        rss = [int(x["check"]) for x in o["runs"] if str(x.get("check") or "").isdigit()]
        if rss:
            o["peak_rss_kib"] = max(rss)
            print(f"    snapshotter peak RSS {max(rss) / 1024:.1f} MiB")
        if o.get("share_of_image") is not None:
            print(f"    fetched {100 * o['share_of_image']:.1f}% of the image's "
                  f"{compressed} compressed bytes (goal < 10%)")
    for m in (m for m in rows if m.startswith("many@")):
        r = rows[m][0]
        out[m] = r
        print(f"  one snapshotter serving {m[5:]} lazy layers: peak RSS "
              f"{int(r['check']) / 1024:.1f} MiB (goal < 200 MiB for 100 layers); {r['note']}")
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
