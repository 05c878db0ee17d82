"""A pysyncobj TCP transport that an unauthenticated client cannot use to stall Raft.

Why this exists: pysyncobj's `TcpConnection` appends every read to an immutable `bytes`
buffer (quadratic), trusts the 4-byte length prefix without a cap, never times out a
connection that sends nothing, and its server listens with a backlog of 5. One client that
announces a 2 GiB frame and then streams kept a node's single tick thread busy copying
buffers, heartbeats were handled late, and followers started elections. This module keeps
pysyncobj's wire format and handshake unchanged and adds:

- a `bytearray` read buffer, a per-event read budget (one connection cannot hold the tick
  thread) and a frame cap checked as soon as the length prefix is in: `max_frame` for peers
  that completed the handshake, `HANDSHAKE_FRAME_MAX` before that (handshake frames are a
  few hundred bytes);
- an authentication deadline: an incoming connection must finish the handshake (with a
  cluster secret that means: its frames decrypt with the secret and it names a known peer)
  within `auth_timeout` seconds or it is closed;
- at most `max_unauthenticated` handshaking connections (and a quarter of that per source
  host); beyond that new connections are closed at once;
- a listen backlog of `LISTEN_BACKLOG`.

The peer protocol itself (pickle inside Fernet, see docs/architecture.md "threat model") is
pysyncobj's; without a cluster secret none of this authenticates anybody.

We subclass rather than fork: `GuardedConnection` overrides TcpConnection's private read
and parse methods by their mangled names. `_check_pysyncobj()` fails at import if a
pysyncobj upgrade renamed them, so the protection cannot silently disappear.
"""
from __future__ import annotations

import errno
import functools
import logging
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection, _getAddrType
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.transport import TCPTransport

log = logging.getLogger(__name__)

# A handshake frame carries a 32-byte random key or a node address, pickled, compressed and
# (with a secret) Fernet-encrypted: ~200 bytes. 4 KiB leaves room and no room for abuse.
HANDSHAKE_FRAME_MAX = 4096
LISTEN_BACKLOG = 128
READ_BUDGET = 1 << 20  # bytes one connection may read per poll event before others get a turn
ACCEPT_BATCH = 64  # connections accepted per poll event on the listening socket
ACCEPT_PAUSE = 0.1  # seconds without accepting after the process ran out of descriptors/memory
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LENGTH = struct.Struct("i")  # pysyncobj's prefix: native signed 32-bit length
_WARN_EVERY = 10.0  # seconds between summary warnings about rejected connections


@dataclass(frozen=True)
class TransportLimits:
    """The limits one node enforces on its Raft port (from RaftConfig)."""

    max_frame: int = 16 << 20
    auth_timeout: float = 5.0
    max_unauthenticated: int = 64

    @property
    def max_unauthenticated_per_host(self) -> int:
        return max(1, self.max_unauthenticated // 4)


def _check_pysyncobj() -> None:
    for name in ("_TcpConnection__processRead", "_TcpConnection__processParseMessage",
                 "_TcpConnection__tryReadBuffer", "_TcpConnection__processConnection"):
        if not callable(getattr(TcpConnection, name, None)):
            raise ImportError(f"pysyncobj changed: TcpConnection.{name} is gone; halb.control.transport "
                              "must be adapted before this pysyncobj version can be used")


_check_pysyncobj()


class GuardedConnection(TcpConnection):
    """TcpConnection with a linear read buffer, a frame cap and a per-event read budget."""

    def __init__(self, *args: Any, max_frame: int, on_reject: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        self._buf = bytearray()
        self._budget = READ_BUDGET
        self.max_frame = max_frame
        self.accepted_at = time.monotonic()
        self.peer_host = ""
        self._on_reject = on_reject
        super().__init__(*args, **kwargs)

    def connect(self, host: str, port: int) -> bool:
        self._buf = bytearray()
        return super().connect(host, port)

    def disconnect(self) -> None:
        self._buf = bytearray()
        super().disconnect()

    def _reject(self, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)
        self.disconnect()

    # --- overrides of TcpConnection's private methods (by their mangled names) ---------

    def _TcpConnection__tryReadBuffer(self) -> None:
        self._budget = READ_BUDGET
        while self._TcpConnection__processRead():
            pass
        self._TcpConnection__lastReadTime = time.monotonic()

    def _TcpConnection__processRead(self) -> bool:
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming:
            self.disconnect()
            return False
        buf = self._buf
        buf += incoming
        self._budget -= len(incoming)
        if len(buf) < 4:
            return self._budget > 0
        (length,) = _LENGTH.unpack_from(buf)
        if length < 0 or length > self.max_frame:
            self._reject(f"frame of {length} bytes announced (limit {self.max_frame})")
            return False
        # Stop once a whole frame is in (it is parsed before we read on) or the budget is spent:
        # the poller is level-triggered, the rest is read on the next event.
        return len(buf) - 4 < length and self._budget > 0

    def _TcpConnection__processParseMessage(self) -> Any:
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _LENGTH.unpack_from(buf)
        if length < 0 or length > self.max_frame:
            self._reject(f"frame of {length} bytes announced (limit {self.max_frame})")
            return None
        if len(buf) - 4 < length:
            return None
        data = bytes(buf[4:4 + length])
        del buf[:4 + length]
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                if stamp < self.recvLastTimestamp:
                    raise ValueError("timestamp went backwards")
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            message = pysyncobj_pickle.loads(zlib.decompress(data))
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception:
            self._reject("frame does not decrypt/decode with the cluster secret")
            return None
        return message


class GuardedServer:
    """The listening socket: a real backlog, batched accepts, and admission control."""

    def __init__(self, poller: Any, host: str, port: int, *, conf: Any,
                 admit: Callable[[str], bool], on_new_connection: Callable[[GuardedConnection], None],
                 on_reject: Callable[[str], None]) -> None:
        self._poller = poller
        self._host, self._port = host, int(port)
        self._conf = conf
        self._admit = admit
        self._on_new_connection = on_new_connection
        self._on_reject = on_reject
        self._socket: socket.socket | None = None
        self._fileno: int | None = None
        self._paused_until = 0.0

    def bind(self) -> None:
        sock = socket.socket(_getAddrType(self._host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._conf.sendBufferSize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._conf.recvBufferSize)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._socket, self._fileno = sock, sock.fileno()
        self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def resume_if_due(self) -> None:
        """Poll the listening socket again after an out-of-resources pause (tick thread)."""
        if self._paused_until and time.monotonic() >= self._paused_until and self._fileno is not None:
            self._paused_until = 0.0
            self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        self._paused_until = 0.0
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _on_event(self, descr: int, event: int) -> None:
        if event & POLL_EVENT_TYPE.ERROR or self._socket is None:
            self.unbind()
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self._socket.accept()
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    # the socket stays readable: stop polling it for a moment instead of spinning
                    # (pysyncobj's server unbinds for good here, leaving the node deaf to peers)
                    self._poller.unsubscribe(descr)
                    self._paused_until = time.monotonic() + ACCEPT_PAUSE
                    self._on_reject(f"accept paused {ACCEPT_PAUSE:g} s: {e.strerror}")
                elif e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EPROTO):
                    self.unbind()
                return
            host = str(addr[0])
            if not self._admit(host):
                # RST instead of FIN: no TIME_WAIT on our side for a connection we never wanted
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._conf.sendBufferSize)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._conf.recvBufferSize)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            conn = GuardedConnection(poller=self._poller, socket=sock, timeout=self._conf.connectionTimeout,
                                     sendBufferSize=self._conf.sendBufferSize,
                                     recvBufferSize=self._conf.recvBufferSize,
                                     keepalive=self._conf.tcp_keepalive,
                                     max_frame=HANDSHAKE_FRAME_MAX, on_reject=self._on_reject)
            conn.peer_host = host
            self._on_new_connection(conn)


class GuardedTransport(TCPTransport):
    """TCPTransport with GuardedServer/GuardedConnection and an authentication deadline.

    Pass `functools.partial(GuardedTransport, limits=...)` as SyncObj's transportClass.
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any, *, limits: TransportLimits) -> None:
        self._limits = limits
        self._pending: dict[GuardedConnection, float] = {}  # handshaking incoming conn -> accepted at
        self._rejects: dict[str, int] = {}
        self._last_warn = 0.0
        super().__init__(syncObj, selfNode, otherNodes)

    @classmethod
    def with_limits(cls, limits: TransportLimits) -> Callable[..., "GuardedTransport"]:
        return functools.partial(cls, limits=limits)

    # --- server and admission ----------------------------------------------------------

    def _createServer(self) -> None:
        conf = self._syncObj.conf
        bind = conf.bindAddress or getattr(self._selfNode, "address", None)
        if bind is None:
            raise RuntimeError("unable to determine the Raft bind address")
        host, port = bind.rsplit(":", 1)
        if conf.bindAddress is None:  # pysyncobj's rule: without bindAddress listen on all addresses
            host = "::" if ":" in host else "0.0.0.0"
        if host not in ("0.0.0.0", "::"):
            host = globalDnsResolver().resolve(host)
        self._server = GuardedServer(self._syncObj._poller, host, int(port), conf=conf,
                                     admit=self._admit, on_new_connection=self._onNewIncomingConnection,
                                     on_reject=self._count_reject)

    def _admit(self, host: str) -> bool:
        if len(self._pending) >= self._limits.max_unauthenticated:
            self._count_reject(f"over {self._limits.max_unauthenticated} unauthenticated connections")
            return False
        if sum(1 for c in self._pending if c.peer_host == host) >= self._limits.max_unauthenticated_per_host:
            self._count_reject(f"over {self._limits.max_unauthenticated_per_host} unauthenticated connections "
                               "from one host")
            return False
        return True

    def _count_reject(self, reason: str) -> None:
        """Count why connections were dropped; warn at most every _WARN_EVERY seconds (an
        attack must not flood the log)."""
        self._rejects[reason] = self._rejects.get(reason, 0) + 1
        self._maybe_warn()

    def _maybe_warn(self) -> None:
        now = time.monotonic()
        if self._rejects and now - self._last_warn >= _WARN_EVERY:
            self._last_warn = now
            summary = "; ".join(f"{n} x {r}" for r, n in sorted(self._rejects.items()))
            self._rejects.clear()
            log.warning("raft port: dropped connections: %s", summary)

    # --- handshake tracking --------------------------------------------------------------

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        self._pending[conn] = time.monotonic()

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        if not self._handshake_shaped(conn, message):
            # pysyncobj would raise in the tick thread on e.g. an unhashable or empty message
            self._count_reject("malformed handshake message")
            conn.disconnect()
            return
        super()._onIncomingMessageReceived(conn, message)
        if (conn in self._pending and conn not in self._unknownConnections
                and conn.state != CONNECTION_STATE.DISCONNECTED):
            # the handshake is complete: this connection is now a known peer's
            del self._pending[conn]
            conn.max_frame = self._limits.max_frame

    def _handshake_shaped(self, conn: Any, message: Any) -> bool:
        """What pysyncobj's handshake accepts: the dialler's random key (with a secret), then
        its address, 'readonly', or a utility command list."""
        if self._syncObj.encryptor and not conn.sendRandKey:
            return isinstance(message, bytes) and 0 < len(message) <= 64
        if isinstance(message, list):
            return bool(message) and isinstance(message[0], str)
        return isinstance(message, str)

    def _onDisconnected(self, conn: Any) -> None:
        self._pending.pop(conn, None)
        super()._onDisconnected(conn)

    def _onTick(self) -> None:
        super()._onTick()
        if isinstance(self._server, GuardedServer):
            self._server.resume_if_due()
        self._maybe_warn()  # also report the tail of an attack that has stopped
        if not self._pending:
            return
        deadline = time.monotonic() - self._limits.auth_timeout
        for conn, accepted in list(self._pending.items()):
            if accepted < deadline:
                self._count_reject(f"no handshake within {self._limits.auth_timeout:g} s")
                conn.disconnect()
                self._pending.pop(conn, None)
                self._unknownConnections.discard(conn)

    # --- outgoing connections ------------------------------------------------------------

    def addNode(self, node: Any) -> None:
        # TCPTransport.addNode with a GuardedConnection for the link we dial
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            conn = GuardedConnection(poller=self._syncObj._poller, timeout=conf.connectionTimeout,
                                     sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                     keepalive=conf.tcp_keepalive, max_frame=self._limits.max_frame,
                                     on_reject=self._count_reject)
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def destroy(self) -> None:
        super().destroy()
        self._pending.clear()


__all__ = ["GuardedConnection", "GuardedServer", "GuardedTransport", "TransportLimits", "HANDSHAKE_FRAME_MAX",
           "LISTEN_BACKLOG"]
