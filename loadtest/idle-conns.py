#!/usr/bin/python3
"""idle-conns.py: open N idle keep-alive connections to a server and report
the server's resident memory (VmRSS of --pid) at each step.

  idle-conns.py --port P --pid PID [-n 10000] [--request /path] [--header 'X-API-Key: k']

Steps, each followed by a VmRSS reading of PID once it has settled:
  base       before any connection
  connected  N connections open, nothing sent
  served     one request sent on each (256 connections at a time) and
             its whole response read (Content-Length or chunked), the
             connection kept open (idle)
Prints "step rss_kib delta_kib per_conn_bytes" lines.  Loopback only;
raises its own RLIMIT_NOFILE to N + 64 (the hard limit must allow it).
Every connection is closed on exit.
"""
import argparse
import resource
import selectors
import socket
import sys
import time


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def settled_rss(pid, bound_s=5.0):
    """VmRSS once three readings 100 ms apart agree (bounded)."""
    last, same, t0 = None, 0, time.monotonic()
    while time.monotonic() - t0 < bound_s:
        v = rss_kib(pid)
        same = same + 1 if v == last else 0
        if same >= 2:
            return v
        last = v
        time.sleep(0.1)
    return rss_kib(pid)


def open_all(host, port, n, deadline_s):
    socks, pending = [], set()
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
        pending.add(s)
        # keep the accept queue from overflowing: drain as we go
        if len(pending) > 512:
            wait_connected(sel, pending, t0, deadline_s, target=256)
    wait_connected(sel, pending, t0, deadline_s, target=0)
    sel.close()
    return socks


def wait_connected(sel, pending, t0, deadline_s, target):
    while len(pending) > target:
        if time.monotonic() - t0 > deadline_s:
            raise SystemExit("idle-conns: connections not established in %ds" % deadline_s)
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                raise SystemExit("idle-conns: connect failed: %s" % err)
            sel.unregister(s)
            pending.discard(s)


def response_done(buf):
    """True once buf holds one whole response (Content-Length or chunked)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].decode("latin-1").lower()
    body = buf[end + 4:]
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip() == "content-length":
            return len(body) >= int(value.strip())
        if name.strip() == "transfer-encoding" and "chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return True


def serve_all(socks, req, deadline_s, wave=256):
    """One request on each connection, `wave` connections at a time, so
    that the upstream sees at most `wave` requests at once."""
    status, t0 = {}, time.monotonic()
    for i in range(0, len(socks), wave):
        serve_wave(socks[i:i + wave], req, t0, deadline_s, status)
    return status


def serve_wave(socks, req, t0, deadline_s, status):
    sel = selectors.DefaultSelector()
    bufs = {}
    for s in socks:
        s.sendall(req)          # small: fits the socket buffer at once
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
    left = len(socks)
    while left > 0:
        if time.monotonic() - t0 > deadline_s:
            raise SystemExit("idle-conns: %d responses missing after %ds" % (left, deadline_s))
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise SystemExit("idle-conns: server closed a connection "
                                 "(%d responses missing), got: %r"
                                 % (left, bufs[s][:200]))
            bufs[s] += data
            if response_done(bufs[s]):
                code = bufs[s][9:12].decode()
                status[code] = status.get(code, 0) + 1
                sel.unregister(s)
                left -= 1
    sel.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--request", default="/")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--deadline", type=int, default=120)
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 64
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise SystemExit("idle-conns: RLIMIT_NOFILE hard limit %d < %d" % (hard, want))
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    base = settled_rss(a.pid)
    print("base %d 0 0" % base, flush=True)
    socks = open_all(a.host, a.port, a.n, a.deadline)
    v = settled_rss(a.pid)
    print("connected %d %d %d" % (v, v - base, (v - base) * 1024 // a.n), flush=True)
    hdrs = "".join(h + "\r\n" for h in a.header)
    req = ("GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (a.request, hdrs)).encode()
    status = serve_all(socks, req, a.deadline)
    v = settled_rss(a.pid)
    print("served %d %d %d" % (v, v - base, (v - base) * 1024 // a.n), flush=True)
    print("status %s" % " ".join("%s=%d" % kv for kv in sorted(status.items())), flush=True)
    for s in socks:
        s.close()


if __name__ == "__main__":
    sys.exit(main())
