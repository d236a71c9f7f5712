#!/usr/bin/env python3
"""Summarise the lazy-read benchmark: a plain-text table on stdout, JSON to a file.

    report_lazy.py RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv, one line per measurement, tab-separated:
    metric  run  status  wall_s  bytes  requests  ranged  check  note
metric: index (imgfs ls building every index through the relay), cat_cold / cat_warm (imgfs
cat of one small file, empty chunk store / again), read_range (dd of the big file through a
mount reading by range), download (curl of the big file's layer blob), esgz_mount / esgz_find
and zchunked_mount / zchunked_find (the eStargz and zstd:chunked twins: a mount from an empty
cache, then a find). "-" where nothing was
measured. key=value pairs go to the JSON's "context".
"""

import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402
from report_lazy_rows import load  # noqa: E402

GOALS = {"cat_s": 0.050, "read_vs_download": 0.70}


def main():
    raw_path, stats_path, out_path = sys.argv[1:4]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[4:])
    with open(stats_path) as f:
        image = json.load(f)
    rows = load(raw_path)

    def med(metric, key, f=lambda r: True):
        vals = [r[key] for r in rows.get(metric, []) if r["status"] == "ok" and r[key] is not None and f(r)]
        return statistics.median(vals) if vals else None

    def mbps(metric):
        vals = [r["bytes"] / r["wall_s"] / 1e6 for r in rows.get(metric, [])
                if r["status"] == "ok" and r["bytes"] and r["wall_s"]]
        return statistics.median(vals) if vals else None

    read, down, fetch = mbps("read_range"), mbps("download"), mbps("fetch_all")
    summary = {
        "index_s": med("index", "wall_s"),
        "index_registry_bytes": med("index", "bytes"),
        "cat_cold_s": med("cat_cold", "wall_s"),
        "cat_cold_registry_bytes": med("cat_cold", "bytes"),
        "cat_cold_ranged_requests": med("cat_cold", "ranged"),
        "cat_warm_s": med("cat_warm", "wall_s"),
        "cat_direct_s": med("cat_direct", "wall_s"),
        "cat_warm_registry_bytes": med("cat_warm", "bytes"),
        "read_range_mb_s": read,
        "download_mb_s": down,
        "read_vs_download": read / down if read and down else None,
        "imgfs_fetch_mb_s": fetch,
        "read_vs_imgfs_fetch": read / fetch if read and fetch else None,
        "estargz_mount_s": med("esgz_mount", "wall_s"),
        "estargz_mount_registry_bytes": med("esgz_mount", "bytes"),
        "estargz_find_s": med("esgz_find", "wall_s"),
        "zchunked_mount_s": med("zchunked_mount", "wall_s"),
        "zchunked_mount_registry_bytes": med("zchunked_mount", "bytes"),
        "zchunked_find_s": med("zchunked_find", "wall_s"),
    }
    esgz_bytes = summary["estargz_mount_registry_bytes"]
    zc_bytes = summary["zchunked_mount_registry_bytes"]
    zc_total = int(ctx["zchunked_bytes"]) if ctx.get("zchunked_bytes", "").isdigit() else None
    goals = {
        "cat under 50 ms (no relay, empty chunk store)": None if summary["cat_direct_s"] is None
        else summary["cat_direct_s"] < GOALS["cat_s"],
        "cat fetches one span (one ranged request)": None if summary["cat_cold_ranged_requests"] is None
        else summary["cat_cold_ranged_requests"] == 1,
        "read by range >= 70% of a download (curl, network only)": None if summary["read_vs_download"] is None
        else summary["read_vs_download"] >= GOALS["read_vs_download"],
        "eStargz mount under 300 ms": None if summary["estargz_mount_s"] is None
        else summary["estargz_mount_s"] < 0.300,
        "eStargz mount fetches under 1% of the image": None if esgz_bytes is None
        else esgz_bytes < 0.01 * image["compressed_bytes"],
        "zstd:chunked mount under 300 ms": None if summary["zchunked_mount_s"] is None
        else summary["zchunked_mount_s"] < 0.300,
        "zstd:chunked mount fetches under 1% of its twin": None if zc_bytes is None or not zc_total
        else zc_bytes < 0.01 * zc_total,
    }
    mismatches = [r for rs in rows.values() for r in rs if r["check"] and "MISMATCH" in r["check"]]

    print(f"\nlazy reads ({ctx.get('small_file')} of layer 0, {ctx.get('big_file')} of layer 1), "
          f"{len(rows.get('cat_cold', []))} runs, medians")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"  index all layers (index build)  {fmt(summary['index_s'], '.3f')} s, "
          f"{fmt(summary['index_registry_bytes'], ',.0f')} bytes from the registry "
          f"(layers {image['compressed_bytes']:,})")
    print(f"  cat via relay, empty chunk store {fmt(summary['cat_cold_s'], '.3f')} s, "
          f"{fmt(summary['cat_cold_registry_bytes'], ',.0f')} bytes, "
          f"{fmt(summary['cat_cold_ranged_requests'], '.0f')} ranged request(s)")
    print(f"  cat, no relay, empty chunk store {fmt(summary['cat_direct_s'], '.3f')} s")
    print(f"  cat, again (chunk store)         {fmt(summary['cat_warm_s'], '.3f')} s, "
          f"{fmt(summary['cat_warm_registry_bytes'], ',.0f')} bytes")
    print(f"  big file by range (mount, dd)    {fmt(read, '.0f')} MB/s")
    print(f"  its layer blob by curl           {fmt(down, '.0f')} MB/s")
    print(f"  ratio                            {fmt(summary['read_vs_download'], '.2f')}")
    print(f"  imgfs fetch (download, verify, store every layer) {fmt(fetch, '.0f')} MB/s; "
          f"read by range / that: {fmt(summary['read_vs_imgfs_fetch'], '.2f')}")
    print(f"  eStargz mount, empty cache       {fmt(summary['estargz_mount_s'], '.3f')} s, "
          f"{fmt(esgz_bytes, ',.0f')} bytes from the registry "
          f"({fmt(None if esgz_bytes is None else 100 * esgz_bytes / image['compressed_bytes'], '.3f')}% "
          f"of the gzip layers)")
    print(f"  find on it                       {fmt(summary['estargz_find_s'], '.3f')} s")
    print(f"  zstd:chunked mount, empty cache  {fmt(summary['zchunked_mount_s'], '.3f')} s, "
          f"{fmt(zc_bytes, ',.0f')} bytes from the registry "
          f"({fmt(None if zc_bytes is None or not zc_total else 100 * zc_bytes / zc_total, '.3f')}% "
          f"of its {fmt(zc_total, ',.0f')} bytes)")
    print(f"  find on it                       {fmt(summary['zchunked_find_s'], '.3f')} s")
    for g, ok in goals.items():
        print(f"  goal: {g}: {'met' if ok else 'NOT met' if ok is not None else 'n/a'}")
    if mismatches:
        print(f"  WRONG BYTES in {len(mismatches)} measurement(s)")

    out = {
        "benchmark": "lazy",
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
