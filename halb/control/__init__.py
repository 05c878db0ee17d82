"""Replicated state: the pure state machine, its commands, and the pysyncobj wrapper.

pysyncobj 0.3.x replaces `socket.inet_ntop` with a Windows-only ctypes shim on import, on
every platform (pysyncobj/win_inet_pton.py). Any later inet_ntop call in the process then
raises TypeError: pyroute2 can no longer decode interface addresses, so VIP code and the
namespace tests that read addresses break in a process that also runs Raft. Importing
pysyncobj here, before any halb module can, and putting the C implementation back keeps
the rest of the process unaffected.
"""
import _socket
import socket

import pysyncobj  # noqa: F401  (the import that clobbers socket.inet_ntop)

socket.inet_ntop = _socket.inet_ntop
