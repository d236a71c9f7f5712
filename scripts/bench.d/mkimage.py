#!/usr/bin/env python3
"""Write the benchmark image as an OCI image layout, deterministically.

    mkimage.py OUT_DIR [--seed N] [--small-files N] [--big-mb N]

Same arguments (and same zlib) -> same bytes, same digests. Five gzip layers:

  0 base     ~62% of the small text files over a few hundred directories, medium files
             (mixed text/random), symlinks (relative, absolute, to a dir, dangling), a
             hardlink, an empty dir, a setuid file, and things upper layers delete
  1 runtime  one big incompressible file (--big-mb MiB from a seeded PRNG) and a few others
  2 app      the remaining small files; overwrites ~500 base files (regular over regular)
  3 patch    whiteouts (files, directories, a symlink, one name of the hardlink pair), an
             opaque directory with new contents, more overwrites
  4 config   small files; re-creates one file deleted in layer 3; whiteout of a layer-2 file

Upper layers never change an entry's type (a file over a directory etc.), so a naive
`tar -x` of every layer in order (the "floor" in scripts/bench) succeeds.

Besides the layout (OUT_DIR/oci-layout, index.json, blobs/) it writes OUT_DIR/stats.json
(counts, sizes, digests) and OUT_DIR/expected.txt: the flattened tree after applying every
layer's whiteouts, one entry per line, sorted bytewise: "PATH d", "PATH f SIZE" or
"PATH l TARGET". scripts/bench compares extracted trees against it.
"""

import argparse
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import tarfile
import time

MTIME = 1700000000  # fixed, so the bytes never depend on when the image was built
TEXT_CORPUS_BYTES = 24 << 20


# --------------------------------------------------------------------------- content


def make_corpus(seed):
    """Compressible, text-like bytes (source-code-ish lines over a Zipf-ish vocabulary)."""
    rng = random.Random(seed * 7919 + 1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(6000)]
    vocab += ["def", "return", "self", "import", "if", "else", "for", "in", "None", "=", "==",
              "(", ")", "{", "}", ":", "0", "1", "#", "//", "const", "let", "fn", "pub"]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    rng.shuffle(weights)
    out = []
    size = 0
    while size < TEXT_CORPUS_BYTES:
        words = rng.choices(vocab, weights=weights, k=4096)
        i = 0
        lines = []
        while i < len(words):
            n = rng.randint(2, 13)
            indent = "    " * rng.randint(0, 3)
            lines.append(indent + " ".join(words[i:i + n]))
            i += n
        chunk = ("\n".join(lines) + "\n").encode()
        out.append(chunk)
        size += len(chunk)
    return b"".join(out)


CORPUS = b""  # set in main() before the worker processes fork


def text_bytes(rng, size, tag):
    head = ("# %s\n" % tag).encode()
    if size <= len(head):
        return head[:size]
    n = size - len(head)
    off = rng.randrange(len(CORPUS) - n)
    return head + CORPUS[off:off + n]


class RandomReader:
    """A file object reading `size` bytes of seeded PRNG output, 1 MiB generated at a time."""

    def __init__(self, seed, size):
        self.rng = random.Random(seed)
        self.left = size
        self.buf = memoryview(b"")

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.left
        n = min(n, self.left)
        parts = []
        while n > 0:
            if not len(self.buf):
                self.buf = memoryview(self.rng.randbytes(min(1 << 20, self.left)))
            take = min(n, len(self.buf))
            parts.append(bytes(self.buf[:take]))
            self.buf = self.buf[take:]
            n -= take
            self.left -= take
        return b"".join(parts)


# --------------------------------------------------------------------------- layer specs
#
# A layer is a list of ops; each op is a tuple:
#   ("dir", path, mode) ("file", path, mode, content) ("big", path, size, seed)
#   ("symlink", path, target) ("hardlink", path, target) ("whiteout", path) ("opaque", dir)
# content is (kind, seed, size) with kind "text" / "mixed", generated lazily in the worker.


def small_dirs(prefix, count):
    return ["%s/pkg%03d/%s" % (prefix, i // 5, ("lib", "data", "doc", "tests", "include")[i % 5])
            for i in range(count)]


def plan(seed, small_files, big_mb):
    rng = random.Random(seed)
    n0 = small_files * 5 // 8
    n1 = small_files - n0
    layers = [[] for _ in range(5)]
    L0, L1, L2, L3, L4 = layers

    def sizes():
        return rng.randint(1024, 16384)

    # ---- layer 0: base
    for d in ("bin", "etc", "usr", "usr/bin", "usr/lib", "var", "var/lib", "var/cache",
              "var/empty", "tmp", "opt", "srv"):
        L0.append(("dir", d, 0o1777 if d == "tmp" else 0o755))
    base_dirs = small_dirs("usr/lib/bench", 300)
    base_files = []
    for i in range(n0):
        d = base_dirs[i % len(base_dirs)]
        p = "%s/m%05d.%s" % (d, i, ("py", "txt", "h", "json", "md")[i % 5])
        base_files.append(p)
        L0.append(("file", p, 0o644, ("text", rng.getrandbits(64), sizes())))
    for i in range(8):
        size = rng.randint(2 << 20, 8 << 20)
        L0.append(("file", "usr/lib/libmedium%d.so.1" % i, 0o755,
                   ("mixed", rng.getrandbits(64), size)))
    L0.append(("file", "usr/bin/python3.11", 0o755, ("mixed", rng.getrandbits(64), 5 << 20)))
    L0.append(("hardlink", "usr/bin/python3", "usr/bin/python3.11"))
    L0.append(("file", "usr/bin/tool", 0o4755, ("text", rng.getrandbits(64), 3000)))
    L0.append(("hardlink", "usr/bin/tool-alias", "usr/bin/tool"))
    L0.append(("symlink", "usr/bin/python", "python3"))
    L0.append(("symlink", "bin/sh", "/usr/bin/tool"))
    L0.append(("symlink", "usr/lib/bench/current", "pkg007"))
    L0.append(("symlink", "usr/lib/dangling", "../nowhere/at/all"))
    for i in range(20):
        L0.append(("symlink", "usr/bin/link%02d" % i, "../lib/libmedium%d.so.1" % (i % 8)))
    # to be deleted by layer 3: a whole directory, single files, a symlink
    for i in range(200):
        L0.append(("file", "var/cache/old/c%03d/entry%d" % (i // 20, i), 0o644,
                   ("text", rng.getrandbits(64), sizes())))
    L0.append(("file", "etc/obsolete.conf", 0o644, ("text", rng.getrandbits(64), 900)))
    L0.append(("file", "etc/keep.conf", 0o644, ("text", rng.getrandbits(64), 700)))
    # replaced wholesale by an opaque directory in layer 3
    for i in range(50):
        L0.append(("file", "etc/app/conf.d/%02d-default.conf" % i, 0o644,
                   ("text", rng.getrandbits(64), sizes())))

    # ---- layer 1: runtime
    L1.append(("big", "opt/data/blob.bin", big_mb << 20, seed * 1000003 + 17))
    L1.append(("file", "opt/data/README", 0o644, ("text", rng.getrandbits(64), 4000)))
    L1.append(("file", "opt/data/index.bin", 0o644, ("mixed", rng.getrandbits(64), 3 << 20)))
    L1.append(("symlink", "opt/current", "data"))

    # ---- layer 2: app + overwrites of base files
    app_dirs = small_dirs("srv/app", 150)
    app_files = []
    for i in range(n1):
        d = app_dirs[i % len(app_dirs)]
        p = "%s/a%05d.%s" % (d, i, ("js", "css", "html", "map")[i % 4])
        app_files.append(p)
        L2.append(("file", p, 0o644, ("text", rng.getrandbits(64), sizes())))
    overwritten = rng.sample(base_files, min(500, len(base_files)))
    for p in overwritten:
        L2.append(("file", p, 0o644, ("text", rng.getrandbits(64), sizes())))
    L2.append(("file", "usr/lib/libmedium3.so.1", 0o755, ("mixed", rng.getrandbits(64), 4 << 20)))

    # ---- layer 3: whiteouts, opaque dir, overwrites
    L3.append(("whiteout", "var/cache/old"))
    L3.append(("whiteout", "etc/obsolete.conf"))
    L3.append(("whiteout", "usr/lib/dangling"))
    L3.append(("whiteout", "usr/bin/tool-alias"))  # one name of a hardlink pair
    for d in rng.sample(base_dirs, 10):  # whole directories of base files
        L3.append(("whiteout", d))
    deleted_dirs = [op[1] for op in L3 if op[0] == "whiteout"]
    survivors = [p for p in base_files
                 if not any(p.startswith(d + "/") for d in deleted_dirs)]
    for p in rng.sample(survivors, 100):  # single base files
        L3.append(("whiteout", p))
    gone_apps = set(rng.sample(app_files, 50))
    for p in sorted(gone_apps):  # single files of layer 2
        L3.append(("whiteout", p))
    L3.append(("opaque", "etc/app/conf.d"))
    for i in range(5):
        L3.append(("file", "etc/app/conf.d/%02d-site.conf" % i, 0o644,
                   ("text", rng.getrandbits(64), 2000)))
    for p in rng.sample(survivors, 200):
        if ("whiteout", p) not in L3:
            L3.append(("file", p, 0o644, ("text", rng.getrandbits(64), sizes())))
    L3.append(("file", "usr/bin/python3", 0o755, ("text", rng.getrandbits(64), 6000)))  # breaks the link

    # ---- layer 4: config
    L4.append(("file", "etc/hostname", 0o644, ("text", rng.getrandbits(64), 64)))
    L4.append(("file", "etc/obsolete.conf", 0o644, ("text", rng.getrandbits(64), 300)))  # back again
    L4.append(("file", "etc/keep.conf", 0o600, ("text", rng.getrandbits(64), 800)))
    L4.append(("whiteout", next(p for p in app_files if p not in gone_apps)))
    L4.append(("dir", "var/empty", 0o700))
    return layers


# --------------------------------------------------------------------------- writing


class HashWriter:
    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)

    def flush(self):
        pass


def tarinfo(name, type_, mode=0o644, size=0, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def content(spec):
    kind, cseed, size = spec
    rng = random.Random(cseed)
    if kind == "text":
        return text_bytes(rng, size, "%016x" % cseed)
    half = size // 2  # "mixed": like a binary, half code-ish noise, half tables/strings
    return rng.randbytes(half) + text_bytes(rng, size - half, "%016x" % cseed)


def write_layer(args):
    index, ops, tmpdir = args
    t0 = time.time()
    tmp = os.path.join(tmpdir, "layer%d.tmp" % index)
    counts = {"dir": 0, "file": 0, "symlink": 0, "hardlink": 0, "whiteout": 0, "opaque": 0}
    with open(tmp, "wb") as raw:
        comp = HashWriter(raw)
        gz = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=comp, mtime=0)
        unc = HashWriter(gz)
        tar = tarfile.open(fileobj=unc, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20)
        made = set()

        def parents(path):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    tar.addfile(tarinfo(d, tarfile.DIRTYPE, 0o755))
                    counts["dir"] += 1

        for op in ops:
            kind, path = op[0], op[1]
            if kind == "dir":
                parents(path)
                if path not in made:
                    made.add(path)
                    tar.addfile(tarinfo(path, tarfile.DIRTYPE, op[2]))
                    counts["dir"] += 1
                continue
            parents(path)
            if kind == "file":
                data = content(op[3])
                tar.addfile(tarinfo(path, tarfile.REGTYPE, op[2], len(data)), io.BytesIO(data))
            elif kind == "big":
                tar.addfile(tarinfo(path, tarfile.REGTYPE, 0o644, op[2]), RandomReader(op[3], op[2]))
                kind = "file"
            elif kind == "symlink":
                tar.addfile(tarinfo(path, tarfile.SYMTYPE, 0o777, linkname=op[2]))
            elif kind == "hardlink":
                tar.addfile(tarinfo(path, tarfile.LNKTYPE, 0o644, linkname=op[2]))
            elif kind == "whiteout":
                d, _, base = path.rpartition("/")
                tar.addfile(tarinfo((d + "/" if d else "") + ".wh." + base, tarfile.REGTYPE))
            elif kind == "opaque":
                if path not in made:
                    made.add(path)
                    tar.addfile(tarinfo(path, tarfile.DIRTYPE, 0o755))
                    counts["dir"] += 1
                tar.addfile(tarinfo(path + "/.wh..wh..opq", tarfile.REGTYPE))
            counts[kind] += 1
        tar.close()
        gz.close()
    digest = comp.h.hexdigest()
    return {
        "index": index,
        "tmp": tmp,
        "digest": "sha256:" + digest,
        "diff_id": "sha256:" + unc.h.hexdigest(),
        "size": comp.n,
        "uncompressed_size": unc.n,
        "entries": counts,
        "seconds": round(time.time() - t0, 2),
    }


def flatten(layers):
    """The tree after applying every layer: {path: "d" | "f SIZE" | "l TARGET"}."""
    tree = {}

    def drop(prefix, keep=()):
        for p in [p for p in tree if p.startswith(prefix + "/") and p not in keep]:
            del tree[p]

    for ops in layers:
        this_layer = set()
        for op in ops:
            kind, path = op[0], op[1]
            if kind == "whiteout":
                tree.pop(path, None)
                drop(path)
                continue
            if kind == "opaque":
                drop(path, keep=this_layer)
                tree[path] = "d"
                continue
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                tree[d] = "d"
                this_layer.add(d)
            if kind == "dir":
                tree[path] = "d"
            elif kind == "file":
                tree[path] = "f %d" % op[3][2]
            elif kind == "big":
                tree[path] = "f %d" % op[2]
            elif kind == "symlink":
                tree[path] = "l " + op[2]
            elif kind == "hardlink":
                tree[path] = tree[op[2]]
            this_layer.add(path)
    return tree


def put_blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main():
    global CORPUS
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--small-files", type=int, default=40000)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()

    t0 = time.time()
    out = a.out
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    CORPUS = make_corpus(a.seed)
    layers = plan(a.seed, a.small_files, a.big_mb)
    # biggest first, so the two long layers run in parallel
    order = sorted(range(len(layers)), key=lambda i: -len(layers[i]) - (1 << 30) * (i == 1))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, a.jobs)) as pool:
        results = pool.map(write_layer, [(i, layers[i], out) for i in order], chunksize=1)
    results.sort(key=lambda r: r["index"])
    for r in results:
        os.replace(r.pop("tmp"), os.path.join(out, "blobs", "sha256", r["digest"][7:]))

    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [r["diff_id"] for r in results]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "imgfs bench layer %d" % r["index"]}
                    for r in results],
    }
    cdigest, csize = put_blob(out, canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": csize},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": r["digest"], "size": r["size"]} for r in results],
    }
    mdigest, msize = put_blob(out, canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": mdigest, "size": msize,
                       "annotations": {"org.opencontainers.image.ref.name": "bench"}}],
    }
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical(index))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))

    tree = flatten(layers)
    with open(os.path.join(out, "expected.txt"), "w") as f:
        for p in sorted(tree):
            f.write("%s %s\n" % (p, tree[p]))
    totals = {k: sum(r["entries"][k] for r in results) for k in results[0]["entries"]}
    stats = {
        "manifest_digest": mdigest,
        "layers": len(results),
        "files": totals["file"],
        "entries": sum(totals.values()),
        "entries_by_type": totals,
        "flattened_entries": len(tree),
        "flattened_files": sum(1 for t in tree.values() if t[0] == "f"),
        "uncompressed_bytes": sum(r["uncompressed_size"] for r in results),
        "compressed_bytes": sum(r["size"] for r in results),
        "layer_details": results,
        "params": {"seed": a.seed, "small_files": a.small_files, "big_mb": a.big_mb},
        "build_seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print("image: %d layers, %d entries (%d files), %.1f MB uncompressed, %.1f MB compressed, %.1fs"
          % (stats["layers"], stats["entries"], stats["files"], stats["uncompressed_bytes"] / 1e6,
             stats["compressed_bytes"] / 1e6, stats["build_seconds"]), file=sys.stderr)


if __name__ == "__main__":
    main()
