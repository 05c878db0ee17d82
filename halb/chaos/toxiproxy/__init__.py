"""A Toxiproxy-compatible fault proxy: the HTTP API plus TCP proxies with toxics.

Use it in-process::

    handle = await start_server("127.0.0.1", 0)   # port 0 = pick a free one
    ...  # drive it at handle.url with any Toxiproxy client
    await handle.stop()

or as a subprocess (``halb toxiproxy serve``), e.g. through :class:`ToxiproxyProcess`.
"""
from __future__ import annotations

from .process import ToxiproxyProcess
from .server import VERSION, ServerHandle, build_app, start_server

__all__ = ["VERSION", "ServerHandle", "ToxiproxyProcess", "build_app", "start_server"]
