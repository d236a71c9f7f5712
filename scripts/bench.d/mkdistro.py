#!/usr/bin/env python3
"""Split a distribution's root filesystem into gzip layers and write them as an OCI layout.

    mkdistro.py ROOTFS OUT_DIR [--ref-name NAME]

The bench image of mkimage.py is synthetic; this one is a real userland (Debian's, from
debootstrap: see mkdistro.sh), for what only a real tree shows: thousands of small
directories, symlink farms, hardlinks, long package trees. Five layers, bottom first:

  0 base     everything not below (/, the usr merge symlinks, lib*, root, run, tmp, ...)
  1 usr-lib  usr/lib*
  2 usr-share usr/share
  3 bin      usr/bin, usr/sbin, usr/libexec, usr/games, usr/include, usr/local, usr/src
  4 var-etc  var, etc

Each layer carries its entries' parent directories, as layers built by docker do. Entries
are written sorted with numeric owners and no user names, so the same ROOTFS gives the same
layers. Besides the layout it writes OUT_DIR/stats.json (entries, directories, sizes, the
manifest digest).
"""

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from multiprocessing import Pool

LAYERS = [
    ("base", None),
    ("usr-lib", ("usr/lib",)),
    ("usr-share", ("usr/share",)),
    ("bin", ("usr/bin", "usr/sbin", "usr/libexec", "usr/games", "usr/include", "usr/local",
             "usr/src")),
    ("var-etc", ("var", "etc")),
]


def layer_of(rel):
    top = "/".join(rel.split("/")[:2])
    for n, (_, prefixes) in enumerate(LAYERS):
        if prefixes and top in prefixes:
            return n
    # usr/lib32, usr/lib64, usr/libx32 go with usr/lib (usr/libexec is listed with bin)
    if top.startswith("usr/lib") and top != "usr/libexec":
        return 1
    if top in ("var", "etc") or rel.split("/")[0] in ("var", "etc"):
        return 4
    return 0


def walk(root):
    """Every path under root (relative, '/'-separated), sorted bytewise, directories first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.append(name if rel == "." else rel + "/" + name)
    return sorted(out, key=lambda p: p.encode("utf-8", "surrogateescape"))


def write_layer(job):
    root, paths, tar_path = job
    h = hashlib.sha256()
    with open(tar_path, "wb") as raw:
        class Hashing:
            def write(self, b):
                h.update(b)
                return raw.write(b)

            def flush(self):
                pass

        with tarfile.open(fileobj=Hashing(), mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for rel in paths:
                ti = tf.gettarinfo(os.path.join(root, rel), arcname=rel)
                ti.uname = ti.gname = ""
                if ti.isreg():
                    with open(os.path.join(root, rel), "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    gz = tar_path + ".gz"
    with open(gz, "wb") as out:
        subprocess.run(["gzip", "-n", "-6", "-c", tar_path], stdout=out, check=True)
    size_tar = os.path.getsize(tar_path)
    os.unlink(tar_path)
    with open(gz, "rb") as f:
        gd = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            gd.update(chunk)
    return gz, "sha256:" + h.hexdigest(), "sha256:" + gd.hexdigest(), size_tar


def put_blob(out, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rootfs")
    ap.add_argument("out")
    ap.add_argument("--ref-name", default="distro")
    a = ap.parse_args()
    t0 = time.time()
    root = os.path.abspath(a.rootfs)
    os.makedirs(os.path.join(a.out, "blobs", "sha256"), exist_ok=True)

    members = [[] for _ in LAYERS]
    dirs = 0
    paths = walk(root)
    for rel in paths:
        st = os.lstat(os.path.join(root, rel))
        if stat.S_ISDIR(st.st_mode):
            dirs += 1
        if stat.S_ISSOCK(st.st_mode):
            continue
        n = layer_of(rel)
        members[n].append(rel)
    for n in range(1, len(LAYERS)):
        parents = set()
        for rel in members[n]:
            p = rel
            while "/" in p:
                p = p.rsplit("/", 1)[0]
                if p in parents:
                    break
                parents.add(p)
        have = set(members[n])
        members[n] = sorted(have | (parents - have),
                            key=lambda p: p.encode("utf-8", "surrogateescape"))

    jobs = [(root, m, os.path.join(a.out, "layer%d.tar" % n)) for n, m in enumerate(members)]
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        done = pool.map(write_layer, jobs)

    layers, diff_ids, uncompressed = [], [], 0
    for gz, diff_id, digest, size_tar in done:
        os.rename(gz, os.path.join(a.out, "blobs", "sha256", digest.split(":")[1]))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": digest,
                       "size": os.path.getsize(os.path.join(a.out, "blobs", "sha256",
                                                            digest.split(":")[1]))})
        diff_ids.append(diff_id)
        uncompressed += size_tar
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "mkdistro.py layer %s" % name} for name, _ in LAYERS],
    }
    cdig, csize = put_blob(a.out, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdig, "size": csize},
                "layers": layers}
    mdig, msize = put_blob(a.out, json.dumps(manifest, sort_keys=True).encode())
    with open(os.path.join(a.out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
             "size": msize, "annotations": {"org.opencontainers.image.ref.name": a.ref_name}}]},
            f)
    stats = {"layers": len(layers), "entries": len(paths), "directories": dirs,
             "layer_entries": [len(m) for m in members],
             "uncompressed_bytes": uncompressed,
             "compressed_bytes": sum(l["size"] for l in layers),
             "manifest_digest": mdig, "build_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print("distro image: %d layers, %d entries (%d dirs), %.1f MB uncompressed, %.1f MB gzip, "
          "%.1fs" % (stats["layers"], stats["entries"], dirs, uncompressed / 1e6,
                     stats["compressed_bytes"] / 1e6, stats["build_seconds"]), file=sys.stderr)


if __name__ == "__main__":
    main()
