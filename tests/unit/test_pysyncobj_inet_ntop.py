"""pysyncobj clobbers socket.inet_ntop on import; halb.control must leave it working."""
import socket
import subprocess
import sys


def test_inet_ntop_works_after_importing_raft() -> None:
    code = ("import socket, halb.control.raft, halb.control.transport, pysyncobj.tcp_connection; "
            "print(socket.inet_ntop(socket.AF_INET, bytes([127, 0, 0, 1])), "
            "socket.inet_ntop(socket.AF_INET6, bytes(15) + bytes([1])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["127.0.0.1", "::1"]
    assert socket.inet_ntop(socket.AF_INET, bytes([10, 1, 2, 3])) == "10.1.2.3"  # this process too
