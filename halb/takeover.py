"""Hot restart: a new `halb node run --takeover` process takes a running node's listening
sockets and Raft identity over, without refusing or resetting a connection.

Why the sockets are *passed* (SCM_RIGHTS, like HAProxy's ``-x`` and Envoy's hot restart)
instead of bound a second time with SO_REUSEPORT: a listening socket that is closed resets
every connection still waiting in its accept queue, and with SO_REUSEPORT the kernel has
already hashed some new connections to the old socket. A passed socket is the same kernel
object in both processes: its queue survives the old process's close().

The protocol runs over ``DATA_DIR/takeover.sock`` (a unix stream socket, mode 0600, peer
uid checked with SO_PEERCRED), one JSON message per length-prefixed frame:

  new -> old  {"op": "hello", "node_id", "pid", "protocol"}
  old -> new  {"ok": true, "pid", "sockets": [[kind, host, port], ...]}  + the fds
              or {"ok": false, "error": "..."} (another takeover running, wrong node, ...)
  new -> old  {"op": "release"}       the new process has everything it can check first
  old -> new  {"ok": true, "op": "released"}   leadership moved away, Raft stopped
              (journal flushed and closed), node.lock released
  new -> old  {"op": "ready"}         Raft open, admin API and data plane serving
  old -> new  {"ok": true}            the old process stops accepting, drains, exits 0

Before "release" either side may give up and the old process carries on as if nothing
happened. Between "released" and "ready" the old process keeps serving its data plane
from its last routing snapshot but has no Raft; if the new process dies there, the old one
exits 1 (its service manager restarts the node, like after a crash). docs/deploy.md.

``node.lock`` (flock) is held by whichever process has Raft open, so two processes never
append to one journal, whatever the handshake does.
"""
from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

SOCKET_NAME = "takeover.sock"
LOCK_NAME = "node.lock"
PROTOCOL = 1
MAX_FRAME = 1 << 20
MAX_FDS = 1024
_LEN = struct.Struct("!I")


class TakeoverError(Exception):
    """The takeover cannot go on; str() is what the operator reads."""


# ------------------------------------------------------------------ socket identity
@dataclass(frozen=True)
class SocketKey:
    """What a listening socket is, independent of the process holding it: the new process
    asks for "a TCP listener on host:port", not for the old one's service names."""

    kind: str  # "tcp" (a data-plane listener), "api" (the admin API), "udp" (DNS responder)
    host: str
    port: int
    # which process of the node accepts on it: 0 the node process, N data-plane worker N
    # (each worker has its own socket in the SO_REUSEPORT group, with its own queue)
    slot: int = 0

    def wire(self) -> list[Any]:
        return [self.kind, self.host, self.port, self.slot]

    @classmethod
    def from_wire(cls, raw: Any) -> "SocketKey":
        if (not isinstance(raw, list) or len(raw) not in (3, 4) or not isinstance(raw[0], str)
                or not isinstance(raw[1], str) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in raw[2:])):
            raise TakeoverError(f"malformed socket description {raw!r}")
        return cls(*raw)

    def __str__(self) -> str:
        return f"{self.kind} {self.host}:{self.port}" + (f" (worker {self.slot})" if self.slot else "")


def key_of(kind: str, sock: socket.socket, slot: int = 0) -> SocketKey:
    host, port = sock.getsockname()[:2]
    return SocketKey(kind, host, port, slot)


@dataclass
class InheritedSockets:
    """Listening sockets received from the old process, taken one by one by whatever binds
    that address in the new one (data plane, admin API); the rest is closed after the
    takeover and named in the log (a service removed in between, a changed address)."""

    socks: dict[SocketKey, socket.socket] = field(default_factory=dict)

    def take(self, kind: str, host: str, port: int, slot: int = 0) -> socket.socket | None:
        if port == 0:  # "any port": nothing to match; bind a new one
            return None
        sock = self.socks.pop(SocketKey(kind, host, port, slot), None)
        if sock is not None:
            sock.setblocking(False)
        return sock

    def take_slot(self, slot: int) -> dict[SocketKey, socket.socket]:
        """Every socket of data-plane worker `slot`: the new worker of that slot gets them."""
        return {k: self.socks.pop(k) for k in [k for k in self.socks if k.slot == slot]}

    @staticmethod
    def env_value(socks: dict[SocketKey, socket.socket]) -> str:
        """HALB_INHERITED_SOCKETS for a worker process: its sockets as slot 0, with fd numbers."""
        return json.dumps([[k.kind, k.host, k.port, s.fileno()] for k, s in socks.items()])

    def load_env(self, value: str) -> None:
        try:
            entries = json.loads(value)
            for kind, host, port, fd in entries:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self.socks[SocketKey(kind, host, int(port))] = socket.socket(family, socket.SOCK_STREAM, fileno=int(fd))
        except (ValueError, TypeError, OSError) as exc:
            log.error("ignoring HALB_INHERITED_SOCKETS: %s", exc)

    def close_rest(self) -> list[SocketKey]:
        left = sorted(self.socks, key=str)
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        return left


# Whoever binds a listener looks here first (set by the node in a --takeover process).
inherited = InheritedSockets()


def take_inherited(kind: str, host: str, port: int) -> socket.socket | None:
    return inherited.take(kind, host, port)


# ------------------------------------------------------------------ framing
def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise TakeoverError(f"message of {len(data)} bytes is too large")
    return _LEN.pack(len(data)) + data


def decode(data: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TakeoverError(f"malformed message: {exc}") from None
    if not isinstance(msg, dict):
        raise TakeoverError("malformed message: not an object")
    return msg


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: Iterable[int] = ()) -> None:
    data = encode(msg)
    fds = list(fds)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One frame and the fds that came with it; EOF before a whole frame is an error."""
    buf = b""
    fds: list[int] = []
    while len(buf) < 4 or len(buf) < 4 + _LEN.unpack(buf[:4])[0]:
        if len(buf) >= 4 and _LEN.unpack(buf[:4])[0] > MAX_FRAME:
            _close_all(fds)
            raise TakeoverError("message too large")
        data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if flags & getattr(socket, "MSG_CTRUNC", 8):
            _close_all(fds)
            raise TakeoverError("too many file descriptors in one message")
        if not data:
            _close_all(fds)
            raise TakeoverError("the other process closed the connection")
        buf += data
    n = _LEN.unpack(buf[:4])[0]
    if len(buf) > 4 + n:
        _close_all(fds)
        raise TakeoverError("unexpected bytes after a message")
    return decode(buf[4:4 + n]), fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def sockets_from_fds(keys: list[SocketKey], fds: list[int]) -> InheritedSockets:
    """Pair the descriptions with the received fds (same order); a count mismatch is an error."""
    if len(keys) != len(fds):
        _close_all(fds)
        raise TakeoverError(f"old process described {len(keys)} sockets but sent {len(fds)}")
    out = InheritedSockets()
    for key, fd in zip(keys, fds):
        family = socket.AF_INET6 if ":" in key.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if key.kind == "udp" else socket.SOCK_STREAM
        out.socks[key] = socket.socket(family, kind, fileno=fd)
    return out


def peer_allowed(sock: socket.socket) -> bool:
    """Only the same user (or root) may ask for this node's sockets; the 0600 mode says the
    same, SO_PEERCRED also holds if the directory's modes are changed."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid() or uid == 0


# ------------------------------------------------------------------ paths and the lock
def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


def listen_unix(path: Path) -> socket.socket:
    """Bind ``path`` atomically (bind a temporary name, chmod 0600, rename over): a
    takeover that connects meanwhile reaches either the old listener or this one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            s.bind(str(tmp))
        finally:
            os.umask(old_umask)
        os.chmod(tmp, 0o600)
        s.listen(4)
        os.replace(tmp, path)
    except BaseException:
        s.close()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    s.setblocking(False)
    return s


class NodeLock:
    """``DATA_DIR/node.lock``: an exclusive flock held while this process has Raft open."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def locked_message(lock: NodeLock, data_dir: Path) -> str:
    return (f"{data_dir} is in use by another halb process (pid {lock.holder()}, {lock.path}); two processes "
            "must never write one Raft journal. To replace a running node without dropping connections use "
            "`halb node run --takeover` (or `halb node reload`); otherwise stop it first")


# ------------------------------------------------------------------ the new process's side
class TakeoverClient:
    """Blocking; the node runs it in a thread (asyncio.to_thread)."""

    def __init__(self, path: Path, node_id: str, timeout: float = 30.0) -> None:
        self.path = path
        self.node_id = node_id
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.old_pid = 0
        self.systemd: dict[str, Any] = {}  # the old process's NOTIFY_SOCKET and watchdog interval

    def hello(self) -> InheritedSockets:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except OSError as exc:
            s.close()
            raise TakeoverError(f"no running node to take over at {self.path} ({exc.strerror or exc}); "
                                "start it without --takeover") from None
        self.sock = s
        send_msg(s, {"op": "hello", "node_id": self.node_id, "pid": os.getpid(), "protocol": PROTOCOL})
        reply, fds = self._recv()
        if not reply.get("ok"):
            _close_all(fds)
            raise TakeoverError(f"the running node refused the takeover: {reply.get('error', 'no reason given')}")
        self.old_pid = int(reply.get("pid", 0))
        self.systemd = reply.get("systemd") if isinstance(reply.get("systemd"), dict) else {}
        keys = [SocketKey.from_wire(k) for k in reply.get("sockets", [])]
        return sockets_from_fds(keys, fds)

    def release(self) -> None:
        self._step({"op": "release"}, "release Raft")

    def ready(self) -> None:
        self._step({"op": "ready"}, "hand over")

    def _step(self, msg: dict[str, Any], what: str) -> None:
        assert self.sock is not None
        send_msg(self.sock, msg)
        reply, fds = self._recv()
        _close_all(fds)
        if not reply.get("ok"):
            raise TakeoverError(f"the running node could not {what}: {reply.get('error', 'no reason given')}")

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        assert self.sock is not None
        try:
            return recv_msg(self.sock)
        except socket.timeout:
            raise TakeoverError(f"the running node did not answer within {self.timeout:g}s") from None
        except OSError as exc:
            raise TakeoverError(f"lost the connection to the running node: {exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
