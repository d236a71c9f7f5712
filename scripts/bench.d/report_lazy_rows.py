"""The raw rows of the lazy and remote benchmarks (tab-separated: metric run status wall_s
bytes requests ranged check note; "-" where nothing was measured), by metric."""


def num(v, conv=float):
    return None if v in ("", "-", None) else conv(v)


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            m, run, st, wall, nbytes, req, ranged, check, note = (line.rstrip("\n").split("\t") + [""] * 9)[:9]
            rows.setdefault(m, []).append({
                "run": int(run), "status": st, "wall_s": num(wall), "bytes": num(nbytes, int),
                "requests": num(req, int), "ranged": num(ranged, int),
                "check": check if check not in ("", "-") else None, "note": note or None,
            })
    return rows
