#!/usr/bin/env python3
"""Summarise the index-artifact benchmark: a plain-text table on stdout, JSON to a file.

    report_remote.py RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv has the lazy benchmark's columns (metric run status wall_s bytes requests ranged
check note). Metrics: build (machine A indexes every layer), push (bytes = index bytes,
requests = entries, ranged = indexes), mount_remote / mount_local (fresh cache through the
counting relay, with and without the published index), find_remote (find over that mount;
requests = entries found).
"""

import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402
from report_lazy_rows import load  # noqa: E402


def main():
    raw_path, stats_path, out_path = sys.argv[1:4]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[4:])
    with open(stats_path) as f:
        image = json.load(f)
    rows = load(raw_path)

    def med(metric, key):
        vals = [r[key] for r in rows.get(metric, []) if r["status"] == "ok" and r[key] is not None]
        return statistics.median(vals) if vals else None

    push = (rows.get("push") or [{}])[0]
    compressed = image["compressed_bytes"]
    entries, ibytes = push.get("requests"), push.get("bytes")
    summary = {
        "build_s": med("build", "wall_s"),
        "push_s": med("push", "wall_s"),
        "index_bytes": ibytes,
        "index_entries": entries,
        "index_bytes_per_entry": ibytes / entries if ibytes and entries else None,
        "index_share_of_layers": ibytes / compressed if ibytes else None,
        "mount_remote_s": med("mount_remote", "wall_s"),
        "mount_remote_registry_bytes": med("mount_remote", "bytes"),
        "mount_local_s": med("mount_local", "wall_s"),
        "mount_local_registry_bytes": med("mount_local", "bytes"),
        "find_remote_s": med("find_remote", "wall_s"),
        "find_remote_entries": med("find_remote", "requests"),
    }
    rb, rs, ls = summary["mount_remote_registry_bytes"], summary["mount_remote_s"], summary["mount_local_s"]
    summary["local_over_remote"] = ls / rs if ls and rs else None
    goals = {
        "fresh-cache mount ready under 300 ms": None if rs is None else rs < 0.300,
        "registry bytes until ready under 2% of the image": None if rb is None else rb < 0.02 * compressed,
    }
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\nindex artifacts, {len(rows.get('mount_remote', []))} runs, medians")
    print(f"  machine A: index build {fmt(summary['build_s'], '.3f')} s, push {fmt(summary['push_s'], '.3f')} s")
    print(f"  artifact: {fmt(ibytes, ',.0f')} bytes for {fmt(entries, ',.0f')} entries = "
          f"{fmt(summary['index_bytes_per_entry'], '.1f')} B/entry, "
          f"{fmt(None if summary['index_share_of_layers'] is None else 100 * summary['index_share_of_layers'], '.2f')}% "
          f"of the layers' {compressed:,} compressed bytes")
    print(f"  machine B mount, published index {fmt(rs, '.3f')} s, {fmt(rb, ',.0f')} bytes from the registry "
          f"({fmt(None if rb is None else 100 * rb / compressed, '.2f')}% of the image)")
    print(f"  machine B mount, local indexing  {fmt(ls, '.3f')} s, "
          f"{fmt(summary['mount_local_registry_bytes'], ',.0f')} bytes ({fmt(summary['local_over_remote'], '.1f')}x slower)")
    print(f"  find on the published-index mount {fmt(summary['find_remote_s'], '.3f')} s, "
          f"{fmt(summary['find_remote_entries'], '.0f')} entries")
    for g, ok in goals.items():
        print(f"  goal: {g}: {'met' if ok else 'NOT met' if ok is not None else 'n/a'}")
    out = {
        "benchmark": "remote",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(ctx.pop("nproc", None)),
        "context": ctx,
        "summary": summary,
        "goals": goals,
        "runs": rows,
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"  written to {out_path}")


main()
