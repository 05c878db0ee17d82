"""GuardedConnection over real loopback TCP, against pysyncobj's own TcpConnection as sender:
legitimate frames (large, encrypted, split into tiny pieces) arrive intact; a frame over the
cap, a negative length, and a frame that does not decrypt with the secret close the
connection, the oversized one as soon as its prefix is in. Plus the config keys."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from halb.config import ConfigError, load_config
from halb.control.transport import HANDSHAKE_FRAME_MAX, GuardedConnection

GOOD = """
node_id = "n1"
secret_file = "secret"
token_file = "token"
[raft]
bind = "127.0.0.11:7100"
peers = ["127.0.0.12:7100", "127.0.0.13:7100"]
[api]
bind = "127.0.0.11:7000"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    (tmp_path / "secret").write_text("s" * 40)
    (tmp_path / "token").write_text("t" * 40)
    return p

SECRET = "s" * 40


@pytest.fixture(scope="module")
def encryptor() -> Any:
    return getEncryptor(SECRET)  # PBKDF2: once per module


class Pair:
    """A raw client socket and, on the accepting side, a GuardedConnection on a real poller."""

    def __init__(self, max_frame: int, encryptor: Any = None) -> None:
        self.poller = createPoller("auto")
        self.received: list[Any] = []
        self.rejects: list[str] = []
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            self.client = socket.create_connection(lst.getsockname())
            server_sock, _ = lst.accept()
        server_sock.setblocking(False)
        self.conn = GuardedConnection(poller=self.poller, socket=server_sock, timeout=30,
                                      max_frame=max_frame, on_reject=self.rejects.append)
        self.conn.encryptor = encryptor
        self.conn.setOnMessageReceivedCallback(self.received.append)

    def pump(self, until: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not until() and time.monotonic() < end:
            self.poller.poll(0.05)

    def closed(self) -> bool:
        return self.conn.state == CONNECTION_STATE.DISCONNECTED

    def close(self) -> None:
        self.client.close()
        self.conn.disconnect()


def frame_of(message: Any, encryptor: Any = None) -> bytes:
    """What pysyncobj's TcpConnection.send puts on the wire (captured from a real one)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        poller = createPoller("auto")
        sender = TcpConnection(poller=poller, socket=a, timeout=30)
        sender.encryptor = encryptor
        sender.send(message)
        data = bytearray()
        end = time.monotonic() + 10
        while (len(data) < 4 or len(data) < 4 + struct.unpack_from("i", data)[0]) and time.monotonic() < end:
            poller.poll(0.01)  # the sender flushes its buffer on write events
            try:
                data += b.recv(1 << 20)
            except BlockingIOError:
                pass
        return bytes(data)
    finally:
        a.close()
        b.close()


def test_large_encrypted_frame_arrives_intact(encryptor):
    payload = {"type": "append_entries", "entries": [(os.urandom(3 << 20), 7, 1)]}  # incompressible 3 MiB
    wire = frame_of(payload, encryptor)
    p = Pair(16 << 20, encryptor)
    sender = threading.Thread(target=p.client.sendall, args=(wire,), daemon=True)  # larger than the socket buffers
    try:
        sender.start()
        p.pump(lambda: p.received or p.closed())
        assert p.received == [payload] and not p.rejects
    finally:
        sender.join(5)
        p.close()


def test_frames_split_into_tiny_pieces_are_reassembled(encryptor):
    msgs = [b"k" * 32, "127.0.0.1:7100", {"type": "request_vote", "term": 3}]
    wire = b"".join(frame_of(m, encryptor) for m in msgs)
    p = Pair(HANDSHAKE_FRAME_MAX, encryptor)
    try:
        for i in range(0, len(wire), 7):
            p.client.sendall(wire[i:i + 7])
            p.poller.poll(0.001)
        p.pump(lambda: len(p.received) == 3 or p.closed())
        assert p.received == msgs and not p.rejects
    finally:
        p.close()


@pytest.mark.parametrize("length", [HANDSHAKE_FRAME_MAX + 1, 0x7FFFFFFF, -1, -(1 << 31)])
def test_oversized_or_negative_prefix_closes_at_once(length):
    p = Pair(HANDSHAKE_FRAME_MAX)
    try:
        # only the prefix: refused before any body (the probe streamed gigabytes after it)
        p.client.sendall(struct.pack("i", length))
        p.pump(p.closed)
        assert p.closed() and p.received == []
        assert "announced" in p.rejects[0]
    finally:
        p.close()


def test_frame_that_does_not_decrypt_with_the_secret_closes(encryptor):
    wrong = frame_of(b"k" * 32, getEncryptor("w" * 40))
    p = Pair(HANDSHAKE_FRAME_MAX, encryptor)
    try:
        p.client.sendall(wrong)
        p.pump(p.closed)
        assert p.closed() and p.received == []
        assert "cluster secret" in p.rejects[0]
    finally:
        p.close()


@pytest.mark.parametrize("line, key, reason", [
    ("max_frame_bytes = 1024", "raft.max_frame_bytes", "must be within"),
    ("max_frame_bytes = 4294967296", "raft.max_frame_bytes", "must be within"),
    ("max_frame_bytes = 5e6", "raft.max_frame_bytes", "must be a int"),
    ("auth_timeout = 0", "raft.auth_timeout", "must be within"),
    ("max_unauthenticated = 2", "raft.max_unauthenticated", "at least 4"),
])
def test_raft_port_limit_config_errors(tmp_path: Path, line: str, key: str, reason: str):
    path = write(tmp_path, GOOD.replace("[api]", f"{line}\n[api]", 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key and reason in err.value.reason


def test_raft_port_limit_config_defaults_and_values(tmp_path: Path):
    assert (lambda r: (r.max_frame_bytes, r.auth_timeout, r.max_unauthenticated))(
        load_config(write(tmp_path, GOOD)).raft) == (16 << 20, 5.0, 64)
    text = GOOD.replace("[api]", "max_frame_bytes = 8388608\nauth_timeout = 2.5\nmax_unauthenticated = 8\n[api]", 1)
    r = load_config(write(tmp_path, text)).raft
    assert (r.max_frame_bytes, r.auth_timeout, r.max_unauthenticated) == (8 << 20, 2.5, 8)


_EMFILE_CHILD = r"""
import resource, socket, sys, time
from types import SimpleNamespace
from pysyncobj.poller import createPoller
from halb.control.transport import GuardedServer

conf = SimpleNamespace(sendBufferSize=1 << 16, recvBufferSize=1 << 16, connectionTimeout=30, tcp_keepalive=None)
poller = createPoller("auto")
accepted, rejects = [], []
server = GuardedServer(poller, "127.0.0.1", 0, conf=conf, admit=lambda host: True,
                       on_new_connection=accepted.append, on_reject=rejects.append)
server.bind()
port = server._socket.getsockname()[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
hog = []
try:
    while True:
        hog.append(socket.socket())  # use up every descriptor
except OSError:
    pass
for s in hog[-2:]:  # room for exactly one client socket (and nothing for accept)
    s.close()
hog = hog[:-2]
client = socket.create_connection(("127.0.0.1", port))
spins = 0
end = time.monotonic() + 0.5
while time.monotonic() < end:
    poller.poll(0.05)
    spins += 1
    server.resume_if_due()
assert server._socket is not None, "the server unbound on EMFILE"
assert rejects and "accept paused" in rejects[0], rejects
assert spins < 100, f"the poll loop spun {spins} times in 0.5 s"
for s in hog:
    s.close()
end = time.monotonic() + 3
while not accepted and time.monotonic() < end:
    server.resume_if_due()
    poller.poll(0.05)
assert accepted, "no accept after descriptors were freed"
print("ok", spins)
"""


def test_out_of_descriptors_pauses_accepts_instead_of_unbinding_or_spinning():
    """pysyncobj's server unbinds for good on EMFILE (the node goes deaf to reconnecting
    peers); ours pauses accepting and resumes. A child process, so RLIMIT_NOFILE is its own."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _EMFILE_CHILD], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
