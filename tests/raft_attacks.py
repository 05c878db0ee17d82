"""Attacks on one node's Raft port, run as their own process (`python -m tests.raft_attacks`).

Used by tests/integration/test_raft_port_attacks.py and tests/fuzz_raft.py. A separate
process, so the attacker's CPU and GIL never slow the test's own write loop. Every attack
is bounded in time (and in connections), talks only to the given 127.0.0.0/8 address, and
reports what the server did with its connections as one JSON line on stdout:

- huge:   announce a 2 GiB frame, then stream random bytes until the server closes.
- random: random bytes of random length, then wait for the server to close.
- half:   up to `half` connections that send a length prefix and part of a frame, then stall.
- idle:   up to `idle` connections that send nothing at all.
- frames: framed garbage: honest and edge-case length prefixes, several frames, split sends.
- replay: (needs --secret-file) a valid first handshake frame, then mutated/garbage frames:
          "garbage after a valid-looking handshake".

For every attack: connections opened, how many the server closed, the longest a connection
stayed open, and (huge) the most bytes one connection got in before it was closed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable

_PREFIX = struct.Struct("i")
_RANDOM = os.urandom(1 << 20)


@dataclass
class Stats:
    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0  # connect() failed or timed out
    max_open_s: float = 0.0  # longest a connection stayed open (closed or still open at the end)
    still_open_at_end: int = 0
    oldest_open_at_end_s: float = 0.0
    max_concurrent: int = 0
    bytes_sent: int = 0
    max_bytes_one_conn: int = 0
    notes: list[str] = field(default_factory=list)


def _rand(n: int) -> bytes:
    start = random.randrange(0, len(_RANDOM) - n) if n < len(_RANDOM) else 0
    return _RANDOM[start:start + n]


def _connect(addr: tuple[str, int], timeout: float = 1.0) -> socket.socket | None:
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except OSError:
        return None
    return s


def _closed(s: socket.socket) -> bool:
    """True if the peer closed or reset this (non-blocking read) socket."""
    try:
        data = s.recv(65536, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


def attack_huge(addr: tuple[str, int], until: float, st: Stats) -> None:
    """A 2 GiB length prefix, then random bytes as fast as the server takes them."""
    while time.monotonic() < until:
        s = _connect(addr)
        if s is None:
            st.refused += 1
            time.sleep(0.05)
            continue
        st.opened += 1
        t0, sent = time.monotonic(), 0
        s.settimeout(0.5)
        try:
            s.sendall(_PREFIX.pack(0x7FFFFFFF))
            while time.monotonic() < until:
                try:
                    sent += s.send(_rand(65536))
                except socket.timeout:
                    continue  # the server is not reading: still open
        except OSError:
            st.closed_by_server += 1
        finally:
            st.bytes_sent += sent
            st.max_bytes_one_conn = max(st.max_bytes_one_conn, sent)
            st.max_open_s = max(st.max_open_s, time.monotonic() - t0)
            s.close()
        time.sleep(0.01)


def attack_random(addr: tuple[str, int], until: float, st: Stats) -> None:
    """Random bytes of random length; then up to 1 s for the server to close."""
    while time.monotonic() < until:
        s = _connect(addr)
        if s is None:
            st.refused += 1
            time.sleep(0.05)
            continue
        st.opened += 1
        t0 = time.monotonic()
        try:
            s.settimeout(1.0)
            blob = _rand(random.randint(1, 65536))
            s.sendall(blob)
            st.bytes_sent += len(blob)
            if s.recv(65536) == b"":
                st.closed_by_server += 1
        except socket.timeout:
            pass
        except OSError:
            st.closed_by_server += 1
        finally:
            st.max_open_s = max(st.max_open_s, time.monotonic() - t0)
            s.close()
        time.sleep(0.01)


def _hold(addr: tuple[str, int], until: float, st: Stats, limit: int, opening: Callable[[socket.socket], None]) -> None:
    """Keep up to `limit` connections open (refilled as the server closes them); record how
    long each one lived."""
    conns: dict[int, tuple[socket.socket, float]] = {}
    poller = select.poll()
    try:
        while time.monotonic() < until:
            budget = 200  # connections opened per round: the attacker must not eat the machine
            while len(conns) < limit and budget > 0 and time.monotonic() < until:
                budget -= 1
                s = _connect(addr, timeout=0.5)
                if s is None:
                    st.refused += 1
                    break
                try:
                    opening(s)
                except OSError:
                    st.opened += 1
                    st.closed_by_server += 1
                    s.close()
                    continue
                st.opened += 1
                conns[s.fileno()] = (s, time.monotonic())
                poller.register(s.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
            st.max_concurrent = max(st.max_concurrent, len(conns))
            for fd, _ev in poller.poll(200):
                s, t0 = conns[fd]
                if _closed(s):
                    st.closed_by_server += 1
                    st.max_open_s = max(st.max_open_s, time.monotonic() - t0)
                    poller.unregister(fd)
                    del conns[fd]
                    s.close()
    finally:
        now = time.monotonic()
        st.still_open_at_end = len(conns)
        for s, t0 in conns.values():
            st.oldest_open_at_end_s = max(st.oldest_open_at_end_s, now - t0)
            st.max_open_s = max(st.max_open_s, now - t0)
            s.close()


def attack_half(addr: tuple[str, int], until: float, st: Stats, limit: int = 50) -> None:
    def opening(s: socket.socket) -> None:
        s.sendall(_PREFIX.pack(1000) + _rand(10))  # a frame that never completes
    _hold(addr, until, st, limit, opening)


def attack_idle(addr: tuple[str, int], until: float, st: Stats, limit: int = 2000) -> None:
    _hold(addr, until, st, limit, lambda s: None)


def attack_replay(addr: tuple[str, int], until: float, st: Stats, secret: str) -> None:
    """A valid first handshake frame (what a sniffer could replay), then garbage: bit-flipped,
    truncated and re-framed copies of valid frames and random bytes. The server must close
    each connection; none may get further than the handshake."""
    from pysyncobj.encryptor import getEncryptor
    import pysyncobj.pickle as pk

    enc = getEncryptor(secret)

    def frame(obj: object) -> bytes:
        data = enc.encrypt_at_time(zlib.compress(pk.dumps(obj), 3), int(time.monotonic()))
        return _PREFIX.pack(len(data)) + data

    def garbage() -> bytes:
        good = frame((os.urandom(32), "127.0.0.1:1"))
        kind = random.randrange(4)
        if kind == 0:  # flip a byte inside the token
            b = bytearray(good)
            i = random.randrange(4, len(b))
            b[i] ^= 1 + random.randrange(255)
            return bytes(b)
        if kind == 1:  # truncated token, honest prefix
            body = good[4:random.randrange(5, len(good))]
            return _PREFIX.pack(len(body)) + body
        if kind == 2:  # the right key but a wrong connection key inside
            return frame((b"x" * 32, ["status"]))
        return _PREFIX.pack(random.randint(-(1 << 31), (1 << 31) - 1)) + _rand(random.randint(0, 4096))

    while time.monotonic() < until:
        s = _connect(addr)
        if s is None:
            st.refused += 1
            time.sleep(0.05)
            continue
        st.opened += 1
        t0 = time.monotonic()
        try:
            s.settimeout(1.0)
            s.sendall(frame(os.urandom(32)))  # step 1 of pysyncobj's handshake: our random key
            reply = s.recv(4096)  # the server's random key (encrypted)
            if not reply:
                st.notes.append("server closed after a valid first frame")
            for _ in range(random.randint(1, 5)):
                blob = garbage()
                s.sendall(blob)
                st.bytes_sent += len(blob)
            while True:  # the server must close: read until EOF or timeout
                if s.recv(65536) == b"":
                    st.closed_by_server += 1
                    break
        except socket.timeout:
            pass
        except OSError:
            st.closed_by_server += 1
        finally:
            st.max_open_s = max(st.max_open_s, time.monotonic() - t0)
            s.close()
        time.sleep(0.01)


_EDGE_LENGTHS = (0, 1, 3, 4095, 4096, 4097, 65536, 1 << 24, (1 << 31) - 1, -1, -(1 << 31))


def attack_frames(addr: tuple[str, int], until: float, st: Stats) -> None:
    """Framed garbage: honest or edge-case length prefixes, several frames per connection,
    sent whole or in small random pieces (partial frames across reads)."""
    while time.monotonic() < until:
        s = _connect(addr)
        if s is None:
            st.refused += 1
            time.sleep(0.05)
            continue
        st.opened += 1
        t0 = time.monotonic()
        try:
            s.settimeout(1.0)
            stream = bytearray()
            for _ in range(random.randint(1, 4)):
                body = _rand(random.choice((0, 1, 31, 150, 4000, 5000, 70000)))
                n = len(body) if random.random() < 0.5 else random.choice(_EDGE_LENGTHS)
                stream += _PREFIX.pack(n) + body
            i = 0
            while i < len(stream):
                step = len(stream) if random.random() < 0.5 else random.randint(1, 64)
                s.sendall(stream[i:i + step])
                st.bytes_sent += len(stream[i:i + step])
                i += step
            if s.recv(65536) == b"":
                st.closed_by_server += 1
        except socket.timeout:
            pass  # e.g. a frame that announced more than was sent: the deadline closes it
        except OSError:
            st.closed_by_server += 1
        finally:
            st.max_open_s = max(st.max_open_s, time.monotonic() - t0)
            s.close()
        time.sleep(0.01)


ATTACKS = ("huge", "random", "half", "idle", "replay", "frames")


def run(target: str, duration: float, attacks: list[str], idle: int = 2000, half: int = 50,
        secret: str | None = None) -> dict[str, dict]:
    host, port = target.rsplit(":", 1)
    if not host.startswith("127."):
        raise SystemExit("raft_attacks only attacks 127.0.0.0/8")
    addr = (host, int(port))
    until = time.monotonic() + duration
    stats = {name: Stats() for name in attacks}
    fns = {"huge": lambda st: attack_huge(addr, until, st), "random": lambda st: attack_random(addr, until, st),
           "half": lambda st: attack_half(addr, until, st, half), "idle": lambda st: attack_idle(addr, until, st, idle),
           "replay": lambda st: attack_replay(addr, until, st, secret or ""),
           "frames": lambda st: attack_frames(addr, until, st)}
    threads = [threading.Thread(target=fns[name], args=(stats[name],), daemon=True) for name in attacks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 10)
    return {name: asdict(st) for name, st in stats.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT of a Raft port on 127.0.0.0/8")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--attacks", default="huge,random,half,idle")
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--half", type=int, default=50)
    p.add_argument("--secret-file", help="cluster secret, for the replay attack")
    a = p.parse_args(argv)
    names = [n for n in a.attacks.split(",") if n]
    if bad := [n for n in names if n not in ATTACKS]:
        p.error(f"unknown attack(s) {bad}; choose from {ATTACKS}")
    if "replay" in names and not a.secret_file:
        p.error("the replay attack needs --secret-file")
    secret = open(a.secret_file).read().strip() if a.secret_file else None
    print(json.dumps(run(a.target, a.duration, names, a.idle, a.half, secret)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
