#!/usr/bin/env python3
"""A TCP relay in front of the benchmark's registry that counts what the registry sends, and
can put an emulated wide-area link between the two.

    countproxy.py UPSTREAM_PORT STATS_FILE [--rtt-ms N] [--rate-mbit R] [--log FILE]

Listens on a free 127.0.0.1 port (printed on stdout), relays every connection to
127.0.0.1:UPSTREAM_PORT, and keeps STATS_FILE up to date (every 50 ms when it changed) with
one JSON object: bytes sent by the registry (headers included), requests and ranged requests
(request heads sniffed on the client side), connections accepted, the link's settings, and
the wall-clock time of the last reset (reset_at).
Truncate the counts (and the request log) by writing "reset" to STATS_FILE + ".ctl".
Loopback only; for measuring, not for serving.

Network conditions (both off by default: then bytes are passed on as they arrive):

  --rtt-ms N     every byte, in each direction, reaches the other side N/2 ms after the
                 relay received it: a delay line per direction (a reader thread stamps each
                 chunk with its due time and a writer thread sends it then), so a stream keeps
                 its throughput and only its start moves. A new connection's first byte
                 towards the registry is held one more RTT, as a TCP handshake would cost:
                 a request on a fresh connection is answered after 2 RTT, on a reused one
                 after 1. No TLS handshake is emulated (the registry speaks plain HTTP).
  --rate-mbit R  the registry's bytes to the client (downstream only; request heads go
                 unlimited) cross one link of R Mbit/s shared by all connections: each chunk
                 (at most 64 KiB) is serialised on the link after the ones before it, first
                 come first served, and its propagation delay (N/2) starts when its last byte
                 is on the link. A reader waits while its chunk is on the link, so the
                 registry is slowed by TCP back-pressure, not buffered in the relay.
  --log FILE     one JSON line per request: connection, method, path, range, seconds since
                 the last reset when the client sent its head (t), when the first and last
                 byte of its answer were handed to the client (first, end), bytes, and whether
                 it opened its connection (new_conn).
"""

import argparse
import json
import os
import queue
import re
import socket
import threading
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("upstream_port", type=int)
ap.add_argument("stats_file")
ap.add_argument("--rtt-ms", type=float, default=0.0)
ap.add_argument("--rate-mbit", type=float, default=0.0)
ap.add_argument("--log")
args = ap.parse_args()

upstream_port = args.upstream_port
stats_path = args.stats_file
ONE_WAY = args.rtt_ms / 2000.0
HANDSHAKE = args.rtt_ms / 1000.0
EMULATED = args.rtt_ms > 0 or args.rate_mbit > 0
# Emulated chunks stay small, so that connections sharing the link interleave finely
# (64 KiB is 2.6 ms at 200 Mbit/s).
CHUNK = 64 << 10 if EMULATED else 1 << 20

lock = threading.Lock()
counts = {"down_bytes": 0, "requests": 0, "ranged_requests": 0, "connections": 0}
version = [0]
epoch = [time.monotonic()]  # request log times are seconds since the last reset
reset_at = [time.time()]  # the same instant by the wall clock (in the stats, for the bench)
log_file = [open(args.log, "w") if args.log else None]  # noqa: SIM115 (kept open)
REQ_LINE = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")
RANGE = re.compile(rb"\r\nrange: *bytes=([0-9,-]+)", re.IGNORECASE)


def bump(key, n):
    with lock:
        counts[key] += n
        version[0] += 1


def sleep_until(t):
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


class Link:
    """The shared downstream link: chunks are serialised at its rate, first come first served."""

    def __init__(self, mbit):
        self.bytes_per_s = mbit * 1e6 / 8
        self.free_at = 0.0
        self.lock = threading.Lock()

    def reserve(self, n):
        """(start, done): when a chunk of n bytes starts and ends crossing the link."""
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + n / self.bytes_per_s
            return start, self.free_at


LINK = Link(args.rate_mbit) if args.rate_mbit > 0 else None


class Conn:
    """One client connection: its id and, for the request log, the request being answered."""

    ids = iter(range(1, 1 << 62))

    def __init__(self):
        self.id = next(Conn.ids)
        self.cur = None
        self.served = 0  # requests seen on this connection

    def requests_seen(self, data, now):
        """Sniffs request heads from the client (one recv's worth) for the request log."""
        if log_file[0] is None:
            return
        heads = list(REQ_LINE.finditer(data))
        with lock:
            for i, m in enumerate(heads):
                self.finish_locked()
                seg = data[m.start():heads[i + 1].start() if i + 1 < len(heads) else len(data)]
                r = RANGE.search(seg)
                self.cur = {"conn": self.id, "method": m.group(1).decode(),
                            "path": m.group(2).decode(errors="replace"),
                            "range": r.group(1).decode() if r else None,
                            "t": now, "first": None, "end": None, "bytes": 0,
                            "new_conn": self.served == 0}
                self.served += 1

    def delivered(self, n, now):
        """n bytes of an answer reached the client at now."""
        if log_file[0] is None:
            return
        with lock:
            c = self.cur
            if c is not None:
                if c["first"] is None:
                    c["first"] = now
                c["end"] = now
                c["bytes"] += n

    def finish_locked(self):
        c, self.cur = self.cur, None
        # (times are kept as read from the clock; a request sent before the last reset is
        # left out of the new log)
        if c is not None and log_file[0] is not None and c["t"] >= epoch[0]:
            for k in ("t", "first", "end"):
                if c[k] is not None:
                    c[k] = round(c[k] - epoch[0], 6)
            log_file[0].write(json.dumps(c) + "\n")
            log_file[0].flush()

    def close(self):
        with lock:
            self.finish_locked()


def count_up(data, tail):
    # request heads: count them, and those asking for a range
    text = (tail + data).lower()
    bump("requests", text.count(b"get /v2/") + text.count(b"head /v2/"))
    bump("ranged_requests", text.count(b"\r\nrange: bytes="))
    return data[-32:]


def shut(*socks):
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src, dst, down, conn):
    """Passes bytes on as they arrive (no emulated link)."""
    tail = b""
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            if down:
                bump("down_bytes", len(data))
                # (before sending: once it is sent, the client may send its next request
                # before this thread runs again)
                conn.delivered(len(data), time.monotonic())
            else:
                conn.requests_seen(data, time.monotonic())
                tail = count_up(data, tail)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        shut(src, dst)


def delay_reader(src, q, down, conn, opened):
    """One direction's input side: each chunk is stamped with when it reaches the far side."""
    tail = b""
    not_before = opened + HANDSHAKE if not down else 0.0
    try:
        while True:
            data = src.recv(CHUNK)
            now = time.monotonic()
            if not data:
                break
            if down:
                bump("down_bytes", len(data))
            else:
                conn.requests_seen(data, now)
                tail = count_up(data, tail)
            done = now
            if down and LINK is not None:
                start, done = LINK.reserve(len(data))
                # hold off reading the next chunk until this one is on the link: one chunk
                # ahead at most, so back-pressure reaches the registry
                sleep_until(start)
            q.put((max(done, not_before) + ONE_WAY, data))
    except OSError:
        pass
    q.put((max(time.monotonic(), not_before) + ONE_WAY, None))


def delay_writer(q, src, dst, down, conn):
    """One direction's output side: sends each chunk when it is due."""
    broken = False
    while True:
        due, data = q.get()
        if data is None:
            break
        if broken:
            continue  # drain, so that the reader never blocks on a full queue
        sleep_until(due)
        if down:
            # before sending: once it is sent, the client may send its next request before
            # this thread runs again
            conn.delivered(len(data), time.monotonic())
        try:
            dst.sendall(data)
        except OSError:
            broken = True
            shut(src, dst)
    shut(src, dst)


def serve(client):
    opened = time.monotonic()
    bump("connections", 1)
    conn = Conn()
    try:
        up = socket.create_connection(("127.0.0.1", upstream_port))
        # Without TCP_NODELAY a relay that passes on a response head and its body in two
        # writes meets Nagle and delayed ACKs: ~13 ms more per request on loopback, measured
        # (a python3 start on an eStargz mount took 3.0 s through the relay, 1.1 s without).
        for s in (up, client):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        shut(client)
        client.close()
        return
    try:
        if not EMULATED:
            t = threading.Thread(target=pump, args=(client, up, False, conn), daemon=True)
            t.start()
            pump(up, client, True, conn)
            t.join()
            return
        # bounded, so that a client that stops reading slows the registry down
        qs = [queue.Queue(maxsize=256), queue.Queue(maxsize=256)]
        threads = [
            threading.Thread(target=delay_reader, args=(client, qs[0], False, conn, opened), daemon=True),
            threading.Thread(target=delay_writer, args=(qs[0], client, up, False, conn), daemon=True),
            threading.Thread(target=delay_reader, args=(up, qs[1], True, conn, opened), daemon=True),
        ]
        for t in threads:
            t.start()
        delay_writer(qs[1], up, client, True, conn)
        for t in threads:
            t.join()
    finally:
        conn.close()
        client.close()
        up.close()


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
                epoch[0], reset_at[0] = time.monotonic(), time.time()
                if log_file[0] is not None:
                    log_file[0].close()
                    log_file[0] = open(args.log, "w")  # noqa: SIM115
        with lock:
            v, snapshot = version[0], dict(counts)
        if v != seen:
            snapshot.update(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit, reset_at=reset_at[0])
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
    ls.listen(128)
    print(ls.getsockname()[1], flush=True)
    threading.Thread(target=writer, daemon=True).start()
    while True:
        client, _ = ls.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


main()
