#!/usr/bin/env python3
"""Summarise the mount benchmark: a plain-text table on stdout, JSON to a file.

    report_mount.py RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv has one line per measurement, tab-separated:
    metric  tool  run  status  wall_s  rss_kib  count  bytes  check  note
metric is cold, warm (mount until `stat MNT` succeeds), find, read, mem (peak RSS after the
find and the read) or index (bytes on disk); "-" where nothing was measured. status is "ok" or
anything else (failed, n/a). key=value pairs are copied into the JSON's "context" (machine
facts come from report.py's machine()).
"""

import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402

SECTIONS = [
    ("cold", "Cold mount, until `stat MNT` succeeds", "s"),
    ("warm", "Warm mount (indexes cached), until `stat MNT` succeeds", "s"),
    ("find", "`find MNT | wc -l`, first walk of a fresh mount (warm index cache)", "s"),
    ("read", "Sequential read of the big file, fresh mount (dd bs=1M, after the find)", "MB/s"),
    ("mem", "Peak RSS (VmHWM) of the mount process after the find and the read", "MB"),
    ("index", "Index size on disk", "bytes"),
]
LABELS = {
    ("cold", "imgfs"): "imgfs mount (empty cache)",
    ("cold", "ratarmount"): "ratarmount (fresh index folder)",
    ("cold", "floor"): "floor: decompress all layers, parallel",
    ("warm", "imgfs"): "imgfs mount (cached indexes)",
    ("warm", "imgfs-fg"): "imgfs mount --foreground (5 ms poll)",
    ("warm", "ratarmount"): "ratarmount (existing index)",
    ("find", "imgfs"): "imgfs mount",
    ("find", "ratarmount"): "ratarmount",
    ("find", "tmpfs"): "tmpfs copy (imgfs pull output)",
    ("read", "imgfs"): "imgfs mount",
    ("read", "ratarmount"): "ratarmount",
    ("mem", "imgfs"): "imgfs mount daemon",
    ("mem", "ratarmount"): "ratarmount (python)",
    ("index", "imgfs"): "imgfs: CACHE/indexes/sha256/*",
    ("index", "ratarmount"): "ratarmount: *.index.sqlite",
}
GOALS = {"warm_mount_s": 0.100, "daemon_peak_rss_mb": 96.0}


def num(v, conv=float):
    return None if v in ("", "-", None) else conv(v)


def stats(values):
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def main():
    raw_path, stats_path, out_path = sys.argv[1:4]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[4:])
    with open(stats_path) as f:
        image_stats = json.load(f)

    groups = {}  # (metric, tool) -> runs, in order of first appearance
    with open(raw_path) as f:
        for line in f:
            if not line.strip():
                continue
            fields = (line.rstrip("\n").split("\t") + [""] * 10)[:10]
            metric, tool, run, status, wall, rss, count, nbytes, check, note = fields
            groups.setdefault((metric, tool), []).append({
                "run": int(run), "status": status, "wall_s": num(wall),
                "rss_mb": None if num(rss) is None else round(num(rss) / 1024, 1),
                "count": num(count, int), "bytes": num(nbytes, int),
                "check": None if check in ("", "-") else check,
                "note": note or None,
            })

    results = {}
    for (metric, tool), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        bad = [r for r in runs if r["status"] != "ok"]
        r = {"label": LABELS.get((metric, tool), tool), "runs": runs,
             "ok_runs": len(ok), "status": "ok" if ok and not bad else ("partial" if ok else "n/a")}
        if bad:
            r["reason"] = bad[0]["note"] or bad[0]["status"]
        if metric in ("cold", "warm", "find"):
            md, mn, mx = stats([x["wall_s"] for x in ok if x["wall_s"] is not None])
            r.update(median_s=md, min_s=mn, max_s=mx)
            rss = [x["rss_mb"] for x in ok if x["rss_mb"] is not None]
            r["peak_rss_mb"] = max(rss) if rss else None
        if metric == "find":
            r["entries"] = sorted({x["count"] for x in runs if x["count"] is not None})
        if metric == "read":
            mbps = [x["bytes"] / x["wall_s"] / 1e6 for x in ok if x["bytes"] and x["wall_s"]]
            md, mn, mx = stats(mbps)
            r.update(median_mb_s=md and round(md, 1), min_mb_s=mn and round(mn, 1),
                     max_mb_s=mx and round(mx, 1),
                     median_s=stats([x["wall_s"] for x in ok])[0],
                     bytes=ok[0]["bytes"] if ok else None)
        if metric == "mem":
            rss = [x["rss_mb"] for x in ok if x["rss_mb"] is not None]
            md, mn, mx = stats(rss)
            r.update(median_mb=md, min_mb=mn, max_mb=mx)
        if metric == "index":
            b = [x["bytes"] for x in ok if x["bytes"] is not None]
            r.update(bytes=max(b) if b else None, files=ok[0]["count"] if ok else None,
                     per_file_bytes=ok[0]["note"] if ok else None,
                     bytes_per_entry=round(max(b) / image_stats["entries"], 1) if b else None,
                     same_every_run=len(set(b)) <= 1)
        checks = sorted({x["check"] for x in runs if x["check"]})
        r["check"] = ", ".join(checks) if checks else "-"
        results.setdefault(metric, {})[tool] = r

    def get(metric, tool, key):
        return results.get(metric, {}).get(tool, {}).get(key)

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None

    imgfs_warm = get("warm", "imgfs", "median_s")
    imgfs_mem = get("mem", "imgfs", "max_mb")
    ratios = {
        "cold_ratarmount_over_imgfs": ratio(get("cold", "ratarmount", "median_s"), get("cold", "imgfs", "median_s")),
        "cold_imgfs_over_floor": ratio(get("cold", "imgfs", "median_s"), get("cold", "floor", "median_s")),
        "warm_ratarmount_over_imgfs": ratio(get("warm", "ratarmount", "median_s"), imgfs_warm),
        "find_imgfs_over_tmpfs": ratio(get("find", "imgfs", "median_s"), get("find", "tmpfs", "median_s")),
        "find_ratarmount_over_imgfs": ratio(get("find", "ratarmount", "median_s"), get("find", "imgfs", "median_s")),
        "read_imgfs_over_ratarmount_mb_s": ratio(get("read", "imgfs", "median_mb_s"), get("read", "ratarmount", "median_mb_s")),
        "mem_ratarmount_over_imgfs": ratio(get("mem", "ratarmount", "max_mb"), imgfs_mem),
    }
    goals = {
        "warm_mount_under_100ms": None if imgfs_warm is None else imgfs_warm < GOALS["warm_mount_s"],
        "daemon_peak_rss_under_96mb": None if imgfs_mem is None else imgfs_mem < GOALS["daemon_peak_rss_mb"],
    }

    m = machine(ctx.pop("nproc", None))
    image = {k: image_stats[k] for k in ("manifest_digest", "layers", "files", "entries",
                                        "flattened_entries", "uncompressed_bytes",
                                        "compressed_bytes", "params", "build_seconds")}
    runs = max((len(v) for v in groups.values()), default=0)
    problems = [p for p in ctx.get("problems", "").split(" | ") if p]
    result = {
        "benchmark": "mount",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": runs, "machine": m, "image": image, "context": ctx,
        "results": results, "ratios": ratios, "goals": goals, "problems": problems,
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_path)

    # ---- text
    p = print
    p("== imgfs benchmark: mount (%d run%s each, median) ==" % (runs, "" if runs == 1 else "s"))
    p("machine: %d cpus, %s, %.1f GiB RAM, kernel %s, %s"
      % (m["nproc"], m["cpu_model"], m["memory_gib"], m["kernel"], m["os"]))
    p("image:   %s  %d layers, %d files (%d entries; %d after whiteouts), %.1f MB uncompressed, %.1f MB compressed"
      % (ctx.get("ref", ""), image["layers"], image["files"], image["entries"],
         image["flattened_entries"], image["uncompressed_bytes"] / 1e6,
         image["compressed_bytes"] / 1e6))
    for k in sorted(ctx):
        if k not in ("ref", "problems"):
            p("%-11s %s" % (k + ":", ctx[k]))
    f2 = lambda v, fmt="%.3f": "n/a" if v is None else fmt % v
    for metric, title, unit in SECTIONS:
        tools = results.get(metric)
        if not tools:
            continue
        p("")
        p("-- " + title)
        if metric in ("cold", "warm", "find"):
            extra = "entries" if metric == "find" else "peak RSS MB"
            hdr = "%-40s %9s %9s %9s %12s  %s" % ("", "median s", "min s", "max s", extra, "check / note")
        elif metric == "read":
            hdr = "%-40s %9s %9s %9s %12s  %s" % ("", "med MB/s", "min MB/s", "max MB/s", "median s", "check")
        elif metric == "mem":
            hdr = "%-40s %9s %9s %9s  %s" % ("", "max MB", "median MB", "min MB", "note (last run)")
        else:
            hdr = "%-40s %12s %7s %14s  %s" % ("", "bytes", "files", "bytes/entry", "per layer (L0 = base)")
        p(hdr)
        for tool, r in tools.items():
            if r["status"] == "n/a":
                p("%-40s %9s   (%s)" % (r["label"], "n/a", (r.get("reason") or "")[:200]))
                continue
            if metric in ("cold", "warm", "find"):
                extra = (",".join(map(str, r["entries"])) if metric == "find"
                         else f2(r["peak_rss_mb"], "%.1f"))
                note = r["check"] if r["check"] != "-" else ""
                p("%-40s %9s %9s %9s %12s  %s" % (r["label"], f2(r["median_s"]), f2(r["min_s"]),
                                                  f2(r["max_s"]), extra, note))
            elif metric == "read":
                p("%-40s %9s %9s %9s %12s  %s" % (r["label"], f2(r["median_mb_s"], "%.0f"),
                                                  f2(r["min_mb_s"], "%.0f"), f2(r["max_mb_s"], "%.0f"),
                                                  f2(r["median_s"]), r["check"]))
            elif metric == "mem":
                p("%-40s %9s %9s %9s  %s" % (r["label"], f2(r["max_mb"], "%.1f"), f2(r["median_mb"], "%.1f"),
                                             f2(r["min_mb"], "%.1f"), r["runs"][-1]["note"] or ""))
            else:
                p("%-40s %12s %7s %14s  %s" % (r["label"], r["bytes"], r["files"], f2(r["bytes_per_entry"], "%.1f"),
                                               r["per_file_bytes"] or ""))
            if r["status"] == "partial":
                p("%-40s (%d of %d runs failed: %s)" % ("", len(r["runs"]) - r["ok_runs"], len(r["runs"]),
                                                        (r.get("reason") or "")[:200]))
    p("")
    fr = lambda v: "n/a" if v is None else "%.2fx" % v
    p("cold: ratarmount / imgfs time:         %s" % fr(ratios["cold_ratarmount_over_imgfs"]))
    p("cold: imgfs / floor time:              %s" % fr(ratios["cold_imgfs_over_floor"]))
    p("warm: ratarmount / imgfs time:         %s" % fr(ratios["warm_ratarmount_over_imgfs"]))
    p("warm: imgfs mount median %s s, goal < %.3f s: %s"
      % (f2(imgfs_warm), GOALS["warm_mount_s"],
         {True: "met", False: "MISSED", None: "n/a"}[goals["warm_mount_under_100ms"]]))
    p("find: imgfs / tmpfs copy time:         %s" % fr(ratios["find_imgfs_over_tmpfs"]))
    p("find: ratarmount / imgfs time:         %s" % fr(ratios["find_ratarmount_over_imgfs"]))
    p("read: imgfs / ratarmount MB/s:         %s  (file: %s, %s bytes; the goal is stated for 256 MiB)"
      % (fr(ratios["read_imgfs_over_ratarmount_mb_s"]), ctx.get("big_file", "?"), ctx.get("big_file_bytes", "?")))
    p("mem:  imgfs daemon peak %s MB, goal < %.0f MB: %s; ratarmount / imgfs: %s"
      % (f2(imgfs_mem, "%.1f"), GOALS["daemon_peak_rss_mb"],
         {True: "met", False: "MISSED", None: "n/a"}[goals["daemon_peak_rss_under_96mb"]],
         fr(ratios["mem_ratarmount_over_imgfs"])))
    p("note: ratarmount does not apply whiteouts (.wh.* files and deleted paths stay visible), so its"
      " entry count and tree check differ")
    if problems:
        p("")
        p("imgfs problems seen:")
        for x in problems:
            p("  - " + x)
    p("json: %s" % out_path)


if __name__ == "__main__":
    main()
