#!/usr/bin/env python3
"""Summarise the WAN benchmark: a plain-text table per scenario on stdout, JSON to a file.

    report_wan.py RAW.tsv STATS.json OUT.json REQUEST_DIR [key=value ...]

RAW.tsv has the lazy benchmark's columns (metric run status wall_s bytes requests ranged
check note); metrics are SCENARIO/PATH (paths: index esgz zchunked noindex pull skopeo cat
read; check_* rows are the relay's own check, their check column the expected seconds).
STATS.json is the distro layout's. REQUEST_DIR holds the relay's request log of each
measurement, SCENARIO.PATH.RUN.jsonl: from it, for the requests sent while the measurement
ran, how many there were, on how many connections, how many were in flight at most and on
average while any was, for how long at least one was (busy; idle is the rest of the
measurement), and how many times one was sent while none was in flight (waves: a path whose
requests go one after another has as many waves as requests). SCENARIO.PATH.RUN.meta says
when the measurement began (start) and the relay's counts were reset (reset_at), wall clock.
key=value pairs go to the JSON's "context" (scenarios, load, workload, ...).
"""

import datetime
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine  # noqa: E402
from report_lazy_rows import load  # noqa: E402

PATHS = (
    ("index", "imgfs mount, published index"),
    ("profile", "imgfs mount, published index and access profile"),
    ("esgz", "imgfs mount, eStargz twin"),
    ("zchunked", "imgfs mount, zstd:chunked twin"),
    ("noindex", "imgfs mount, no index anywhere"),
    ("pull", "imgfs pull, then run"),
    ("skopeo", "skopeo copy + umoci unpack, then run"),
    ("cat", "imgfs cat of one small file"),
    ("read", "dd of the biggest file under /usr"),
)
CHECKS = ("check_small", "check_reuse", "check_range", "check_shared")
HEADLINE = "40ms-200Mbit"


def link(scenario):
    """(rtt seconds, rate bytes/s or None) of a scenario's name."""
    m = re.fullmatch(r"(\d+)ms-(\d+)Mbit", scenario)
    if not m:
        return 0.0, None
    return int(m.group(1)) / 1000, int(m.group(2)) * 1e6 / 8


def requests_of(path, wall):
    """What the relay's request log says about one measurement (None without a log)."""
    if not os.path.exists(path):
        return None
    # the log's times count from the relay's reset; the measurement began a little later
    shift = 0.0
    try:
        with open(path[:-len(".jsonl")] + ".meta") as f:
            meta = json.load(f)
        shift = meta["start"] - meta["reset_at"]
    except (OSError, ValueError, KeyError):
        pass
    reqs = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            for k in ("t", "first", "end"):
                if r[k] is not None:
                    r[k] -= shift
            if wall is None or r["t"] <= wall:
                reqs.append(r)
    if not reqs:
        return {"requests": 0}
    spans = [(r["t"], r["end"] if r["end"] is not None else r["t"]) for r in reqs]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    inflight = peak = waves = 0
    busy = 0.0
    since = None
    for t, d in events:
        if inflight == 0 and d > 0:
            since = t
            waves += 1
        inflight += d
        peak = max(peak, inflight)
        if inflight == 0 and since is not None:
            busy += t - since
            since = None
    total = sum(b - a for a, b in spans)
    ttfb = [r["first"] - r["t"] for r in reqs if r["first"] is not None]
    return {
        "requests": len(reqs),
        "connections": len({r["conn"] for r in reqs}),
        "new_connections": sum(1 for r in reqs if r["new_conn"]),
        "ranged": sum(1 for r in reqs if r["range"]),
        "max_in_flight": peak,
        "busy_s": round(busy, 3),
        "idle_s": round(wall - busy, 3) if wall is not None else None,
        "waves": waves,
        "mean_in_flight": round(total / busy, 2) if busy > 0 else None,
        "first_request_s": round(min(a for a, _ in spans), 3),
        "last_answer_s": round(max(b for _, b in spans), 3),
        "median_ttfb_s": round(statistics.median(ttfb), 4) if ttfb else None,
        "bytes_answered": sum(r["bytes"] for r in reqs),
    }


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def summarise(rows, reqdir, scenario, path):
    runs = rows.get(f"{scenario}/{path}", [])
    for r in runs:
        r["relay_log"] = requests_of(os.path.join(reqdir, f"{scenario}.{path}.{r['run']}.jsonl"),
                                     r["wall_s"])
    ok = [r for r in runs if r["status"] == "ok"]
    walls = [r["wall_s"] for r in ok]
    logs = [r["relay_log"] for r in ok if r["relay_log"]]
    out = {
        "runs": runs, "failed": len(runs) - len(ok),
        "median_s": med(walls), "min_s": min(walls) if walls else None,
        "max_s": max(walls) if walls else None,
        "median_bytes": med([r["bytes"] for r in ok]),
        "median_requests": med([r["requests"] for r in ok]),
    }
    for k in ("connections", "max_in_flight", "busy_s", "idle_s", "waves", "mean_in_flight",
              "median_ttfb_s"):
        out["median_" + k] = med([lg.get(k) for lg in logs])
    return out


def goals(sc, scenario, image_bytes, rtt, rate):
    """The issue's goals, each (text, measured, met) — None where a figure is missing."""
    g = []
    idx, esgz, nod, pull = (sc.get(p, {}).get("median_s") for p in ("index", "esgz", "noindex", "pull"))
    if idx is not None:
        g.append(("published index: python3 start <= 1.2 s", f"{idx:.2f} s", idx <= 1.2))
    prof = sc.get("profile", {}).get("median_s")
    if prof is not None:
        g.append(("published profile: python3 start <= 0.8 s", f"{prof:.2f} s", prof <= 0.8))
    if esgz is not None:
        g.append(("eStargz: python3 start <= 1.2 s", f"{esgz:.2f} s", esgz <= 1.2))
    if idx and pull:
        g.append((">= 15x faster than imgfs pull + run (published index)", f"{pull / idx:.1f}x",
                  pull / idx >= 15))
    if nod is not None and pull:
        g.append(("no index: <= 1.05x the time of imgfs pull + run", f"{nod / pull:.2f}x",
                  nod / pull <= 1.05))
    nb = sc.get("noindex", {}).get("median_bytes")
    # The image as a pull fetches it (manifest, config and layers, headers included) when
    # the run has one; its layers alone otherwise.
    whole = sc.get("pull", {}).get("median_bytes") or image_bytes
    if nb is not None and whole:
        g.append(("no index: never more bytes than the image (as imgfs pull fetches it)",
                  f"{nb / 1e6:.1f} MB of {whole / 1e6:.1f} MB ({100 * nb / whole:.1f} %)",
                  nb <= whole))
    cat = sc.get("cat", {})
    if cat.get("median_s") is not None and cat.get("median_bytes") is not None and rate:
        bound = 4 * rtt + cat["median_bytes"] / rate
        g.append(("cat of one small file: <= 4 round trips + the span's transfer time",
                  f"{cat['median_s']:.3f} s against {bound:.3f} s "
                  f"({(cat['median_s'] - cat['median_bytes'] / rate) / rtt:.1f} RTT + transfer)",
                  cat["median_s"] <= bound))
    rd = sc.get("read", {})
    if rd.get("median_s") and rd.get("median_bytes") is not None and rate:
        share = rd["median_bytes"] / rd["median_s"] / rate
        g.append(("sequential read by range: >= 85 % of the link rate",
                  f"{100 * share:.0f} % ({rd['median_bytes'] / rd['median_s'] / 1e6:.1f} MB/s fetched)",
                  share >= 0.85))
    return [{"goal": a, "measured": b, "met": c} for a, b, c in g]


def main():
    raw_path, stats_path, out_path, reqdir = sys.argv[1:5]
    ctx = dict(kv.split("=", 1) for kv in sys.argv[5:])
    with open(stats_path) as f:
        image = json.load(f)
    rows = load(raw_path)
    image_bytes = image.get("compressed_bytes")
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(ctx.pop("nproc", None)), "image": image, "context": ctx,
           "scenarios": {}}
    scenarios = []
    for m in rows:
        s = m.split("/", 1)[0]
        if s != "all" and s not in scenarios:
            scenarios.append(s)
    for m, r in rows.items():
        if m.startswith("all/"):
            out.setdefault("unavailable", {})[m[4:]] = r[0]["note"]
    for scen in scenarios:
        rtt, rate = link(scen)
        sc = {"rtt_s": rtt, "rate_bytes_per_s": rate, "checks": {}}
        for c in CHECKS:
            for r in rows.get(f"{scen}/{c}", []):
                sc["checks"][c] = {"measured_s": r["wall_s"], "expected_s": float(r["check"]) if r["check"] else None,
                                   "note": r["note"], "status": r["status"]}
        for p, _ in PATHS:
            if f"{scen}/{p}" in rows:
                sc[p] = summarise(rows, reqdir, scen, p)
        pull, idx = sc.get("pull", {}).get("median_s"), sc.get("index", {}).get("median_s")
        sc["ratios_over_pull"] = {p: pull / sc[p]["median_s"] for p, _ in PATHS
                                  if p in sc and pull and sc[p]["median_s"] and p not in ("cat", "read")}
        # the issue sets its goals for the emulated links (the headline: 40 ms, 200 Mbit/s)
        sc["goals"] = goals(sc, scen, image_bytes, rtt, rate) if rate else []
        out["scenarios"][scen] = sc

        print(f"wan {scen}: {ctx.get('workload', '')}")
        for c, v in sc["checks"].items():
            print(f"  relay {c:13} {fmt(v['measured_s'], '.3f')} s (expected {fmt(v['expected_s'], '.3f')} s)")
        print(f"  {'path':38} {'median':>7} {'min':>7} {'max':>7} {'MB':>8} {'req':>5} {'conn':>4} "
              f"{'peak':>4} {'waves':>5} {'busy s':>6} {'idle s':>6} {'x pull':>6}")
        for p, label in PATHS:
            if p not in sc:
                continue
            o = sc[p]
            x = sc["ratios_over_pull"].get(p)
            print(f"  {label:38} {fmt(o['median_s']):>7} {fmt(o['min_s']):>7} {fmt(o['max_s']):>7} "
                  f"{fmt(None if o['median_bytes'] is None else o['median_bytes'] / 1e6, '.1f'):>8} "
                  f"{fmt(o['median_requests'], '.0f'):>5} {fmt(o['median_connections'], '.0f'):>4} "
                  f"{fmt(o['median_max_in_flight'], '.0f'):>4} {fmt(o['median_waves'], '.0f'):>5} "
                  f"{fmt(o['median_busy_s']):>6} {fmt(o['median_idle_s']):>6} "
                  f"{fmt(x, '.1f'):>6}{'  FAILED runs: %d' % o['failed'] if o['failed'] else ''}")
        for g in sc["goals"]:
            print(f"  goal{' (set for 40 ms / 200 Mbit/s)' if scen != HEADLINE else ''}: {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'NOT met'}")
        if idx and scen == HEADLINE:
            out["headline"] = {"scenario": scen, "index_s": idx, "pull_s": pull,
                               "pull_over_index": pull / idx if pull else None}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
