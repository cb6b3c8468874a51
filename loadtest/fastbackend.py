"""Bulk TCP endpoints for the load tests: a sink that reads and discards, and a sender.

nginx serves the small-request cases; bulk transfer needs a peer that moves bytes with as
little CPU as possible so the proxy in between is what is measured. Both sides are
blocking sockets with large buffers: the copy happens in the kernel with the GIL released.

- `sink --port P`: accepts connections (one thread each), reads into a 1 MiB buffer until
  EOF, then answers the byte count as one ASCII line and closes. Prints `ready PORT`.
- `send --port P --bytes N`: connects, sends N bytes in large chunks, half-closes, reads
  the sink's count back, and prints one JSON line: bytes, seconds (connect to the count),
  acked (the sink's count).

Run: `python -m loadtest.fastbackend sink --port 0` / `... send --port P --bytes 1073741824`.
Knows nothing of proxies or reports.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK = 1 << 20  # bytes per send/recv call
SOCK_BUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF asked for (the kernel may cap it)


def _serve_one(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        while True:
            n = conn.recv_into(view)
            if not n:
                break
            total += n
        conn.sendall(f"{total}\n".encode())
    except OSError:
        pass
    finally:
        conn.close()


def sink(host: str, port: int) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1024)
    print(f"ready {srv.getsockname()[1]}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def send(host: str, port: int, nbytes: int, timeout: float) -> dict[str, float | int]:
    data = memoryview(bytes(CHUNK))
    started = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        left = nbytes
        while left > 0:
            chunk = data if left >= CHUNK else data[:left]
            sock.sendall(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            part = sock.recv(256)
            if not part:
                break
            reply += part
    finally:
        sock.close()
    seconds = time.perf_counter() - started
    acked = int(reply.strip() or b"-1")
    return {"bytes": nbytes, "seconds": seconds, "acked": acked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fastbackend")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sink", help="read and discard; answer the byte count at EOF")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p = sub.add_parser("send", help="send N bytes, half-close, read the sink's count")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.command == "sink":
        try:
            return sink(args.host, args.port)
        except KeyboardInterrupt:
            return 0
    try:
        result = send(args.host, args.port, args.bytes, args.timeout)
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0 if result["acked"] == result["bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
