#!/usr/bin/env python3
"""Pick a small regular file from the middle of a gzip layer that the flattened image keeps.

    pickfile.py LAYER_BLOB EXPECTED_TXT

Prints "PATH SIZE SHA256" of the middle one (in tar order) of the layer's regular files of
4-64 KiB that expected.txt lists with the same size.
"""

import hashlib
import sys
import tarfile

blob, expected = sys.argv[1:3]
keep = {}
with open(expected) as f:
    for line in f:
        parts = line.rstrip("\n").rsplit(" ", 2)
        if len(parts) == 3 and parts[1] == "f":
            keep[parts[0]] = int(parts[2])
found = []
with tarfile.open(blob, "r|gz") as t:
    for m in t:
        name = m.name.lstrip("./")
        if m.isreg() and 4096 <= m.size <= 65536 and keep.get(name) == m.size:
            found.append((name, m.size))
name, size = found[len(found) // 2]
with tarfile.open(blob, "r|gz") as t:
    for m in t:
        if m.name.lstrip("./") == name:
            data = t.extractfile(m).read()
            print(name, size, hashlib.sha256(data).hexdigest())
            break
