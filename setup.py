"""Build hook for halb's optional C extensions; all metadata lives in pyproject.toml.

halb.dataplane._fasthttp speeds up the HTTP proxy's head handling; halb.dataplane._accesslog
formats access-log lines; halb.dataplane._tcprelay
relays TCP mode's connections below Python (Linux epoll); halb.health._probe runs the health
prober's TCP connects (socket, connect, epoll, close) in C; halb.certs._tlsdirect makes a TLS
connection's per-record OpenSSL calls (read, write, pending) for uvloop's SSL protocol, on the
libssl CPython's _ssl uses (no OpenSSL headers needed). All are optional: where no C
compiler is available (or, for the relay and the prober, no epoll) the build skips them and
halb uses its pure-Python paths (llhttp through httptools; asyncio Protocols for TCP mode;
Python sockets in halb/health/connect_set.py; CPython's ssl methods).
"""
from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension("halb.dataplane._fasthttp", ["halb/dataplane/_fasthttp.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("halb.dataplane._accesslog", ["halb/dataplane/_accesslog.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("halb.dataplane._tcprelay", ["halb/dataplane/_tcprelay.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("halb.health._probe", ["halb/health/_probe.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("halb.certs._tlsdirect", ["halb/certs/_tlsdirect.c"],
                  extra_compile_args=_FLAGS, libraries=["dl"], optional=True),
    ]
)
