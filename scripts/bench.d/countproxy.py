#!/usr/bin/env python3
"""A TCP relay in front of the benchmark's registry that counts what the registry sends.

    countproxy.py UPSTREAM_PORT STATS_FILE

Listens on a free 127.0.0.1 port (printed on stdout), relays every connection to
127.0.0.1:UPSTREAM_PORT, and keeps STATS_FILE up to date (every 50 ms when it changed) with
one JSON object: bytes sent by the registry (headers included), requests and ranged requests
(request heads sniffed on the client side). Truncate the counts by writing "reset" to
STATS_FILE + ".ctl". Loopback only; for measuring, not for serving.
"""

import json
import os
import socket
import sys
import threading
import time

upstream_port = int(sys.argv[1])
stats_path = sys.argv[2]
lock = threading.Lock()
counts = {"down_bytes": 0, "requests": 0, "ranged_requests": 0}
version = [0]


def bump(key, n):
    with lock:
        counts[key] += n
        version[0] += 1


def pump(src, dst, down):
    tail = b""
    try:
        while True:
            data = src.recv(1 << 20)
            if not data:
                break
            if down:
                bump("down_bytes", len(data))
            else:
                # request heads: count them, and those asking for a range
                text = (tail + data).lower()
                bump("requests", text.count(b"get /v2/") + text.count(b"head /v2/"))
                bump("ranged_requests", text.count(b"\r\nrange: bytes="))
                tail = data[-32:]
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(conn):
    up = socket.create_connection(("127.0.0.1", upstream_port))
    threading.Thread(target=pump, args=(conn, up, False), daemon=True).start()
    pump(up, conn, True)


def writer():
    seen = -1
    ctl = stats_path + ".ctl"
    while True:
        if os.path.exists(ctl):
            os.unlink(ctl)
            with lock:
                for k in counts:
                    counts[k] = 0
                version[0] += 1
        with lock:
            v, snapshot = version[0], dict(counts)
        if v != seen:
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snapshot, f)
            os.replace(tmp, stats_path)
            seen = v
        time.sleep(0.05)


def main():
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    print(ls.getsockname()[1], flush=True)
    threading.Thread(target=writer, daemon=True).start()
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
