#!/usr/bin/env python3
"""Summarise one benchmark's raw measurements: a plain-text table on stdout, JSON to a file.

    report.py NAME RAW.tsv STATS.json OUT.json [key=value ...]

RAW.tsv has one line per measurement, tab-separated:
    tool  run  status  wall_seconds  peak_rss_kib  check  note
status is "ok" or anything else (failed, n/a); wall and rss are "-" when not measured.
Tools are shown in the order they first appear. key=value pairs (nproc=2, ref=..., ...) are
copied into the JSON's "context". Ratios are "time of X / time of the first tool".
"""

import datetime
import json
import os
import platform
import statistics
import sys

LABELS = {
    "imgfs": "imgfs pull",
    "skopeo+umoci": "skopeo copy + umoci unpack",
    "floor": "floor: curl | tar -xz per layer",
    "imgfs-git": "imgfs pull --git",
}
# Ratios against imgfs pull: (tool, JSON key, text label).
RATIOS = (
    ("skopeo+umoci", "skopeo_umoci_over_imgfs", "skopeo+umoci time / imgfs time"),
    ("floor", "floor_over_imgfs", "floor time / imgfs time"),
    ("imgfs-git", "git_over_imgfs", "imgfs --git time / imgfs time"),
)


def machine(nproc):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": int(nproc) if nproc else os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
        if hasattr(platform, "freedesktop_os_release") else "?",
    }


def main():
    name, raw_path, stats_path, out_path = sys.argv[1:5]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[5:])
    with open(stats_path) as f:
        stats = json.load(f)

    tools = {}
    with open(raw_path) as f:
        for line in f:
            if not line.strip():
                continue
            tool, run, status, wall, rss, check, note = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
            t = tools.setdefault(tool, {"runs": []})
            t["runs"].append({
                "run": int(run), "status": status,
                "wall_s": float(wall) if wall not in ("", "-") else None,
                "peak_rss_mb": round(int(rss) / 1024, 1) if rss not in ("", "-") else None,
                "check": check or None, "note": note or None,
            })

    for tool, t in tools.items():
        ok = [r for r in t["runs"] if r["status"] == "ok" and r["wall_s"] is not None]
        t["label"] = LABELS.get(tool, tool)
        if ok and len(ok) == len(t["runs"]):
            walls = [r["wall_s"] for r in ok]
            t.update(status="ok", median_s=round(statistics.median(walls), 3),
                     min_s=round(min(walls), 3), max_s=round(max(walls), 3),
                     peak_rss_mb=max(r["peak_rss_mb"] or 0 for r in ok))
        else:
            bad = next((r for r in t["runs"] if r["status"] != "ok"), None)
            t.update(status="n/a", median_s=None, min_s=None, max_s=None, peak_rss_mb=None,
                     reason=(bad["note"] or bad["status"]) if bad else "no runs")
        checks = sorted({r["check"] for r in t["runs"] if r["check"]})
        t["check"] = ", ".join(checks) if checks else "-"

    base = tools.get("imgfs")
    ratios = {}
    for tool, key, _ in RATIOS:
        if tool not in tools:
            continue
        t = tools.get(tool)
        if base and t and base["median_s"] and t["median_s"]:
            ratios[key] = round(t["median_s"] / base["median_s"], 2)
        else:
            ratios[key] = None

    m = machine(ctx.pop("nproc", None))
    image = {k: stats[k] for k in ("manifest_digest", "layers", "files", "entries",
                                  "flattened_entries", "uncompressed_bytes", "compressed_bytes",
                                  "params", "build_seconds")}
    image["layer_sizes"] = [{"digest": l["digest"], "compressed": l["size"],
                             "uncompressed": l["uncompressed_size"]} for l in stats["layer_details"]]
    runs = max((len(t["runs"]) for t in tools.values()), default=0)
    result = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": runs,
        "machine": m,
        "image": image,
        "context": ctx,
        "results": tools,
        "ratios": ratios,
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_path)

    # ---- text
    p = print
    p("== imgfs benchmark: %s (%d run%s each, median) ==" % (name, runs, "" if runs == 1 else "s"))
    p("machine: %d cpus, %s, %.1f GiB RAM, kernel %s, %s"
      % (m["nproc"], m["cpu_model"], m["memory_gib"], m["kernel"], m["os"]))
    p("image:   %s  %d layers, %d files (%d entries; %d after whiteouts), %.1f MB uncompressed, %.1f MB compressed"
      % (ctx.get("ref", ""), image["layers"], image["files"], image["entries"],
         image["flattened_entries"], image["uncompressed_bytes"] / 1e6,
         image["compressed_bytes"] / 1e6))
    for k in sorted(ctx):
        if k != "ref":
            p("%-8s %s" % (k + ":", ctx[k]))
    p("")
    hdr = "%-34s %9s %9s %9s %12s  %s" % ("tool", "median s", "min s", "max s", "peak RSS MB", "tree check")
    p(hdr)
    p("-" * len(hdr))
    for tool, t in tools.items():
        if t["status"] == "ok":
            p("%-34s %9.2f %9.2f %9.2f %12.1f  %s" % (t["label"], t["median_s"], t["min_s"],
                                                  t["max_s"], t["peak_rss_mb"], t["check"]))
        else:
            p("%-34s %9s %9s %9s %12s  %s" % (t["label"], "n/a", "", "", "", t["check"]))
            p("%-34s (%s)" % ("", t.get("reason", "")[:200]))
    p("")
    fmt = lambda v: "n/a" if v is None else "%.2fx" % v
    for tool, key, label in RATIOS:
        if key in ratios:
            p("%-31s %s" % (label + ":", fmt(ratios[key])))
    p("json: %s" % out_path)


if __name__ == "__main__":
    main()
