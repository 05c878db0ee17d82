"""Build hook for halb's optional C extensions; all metadata lives in pyproject.toml.

halb.dataplane._fasthttp speeds up the HTTP proxy's head handling. It is optional: where no
C compiler is available the build skips it and the proxy uses its pure-Python path (llhttp
through httptools), which is also the path for every request the fast path does not take.
halb.health._probe runs the health prober's TCP connects (socket, connect, epoll, close)
in C; without it the prober does the same through Python sockets (connect_set.py).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "halb.dataplane._fasthttp",
            ["halb/dataplane/_fasthttp.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "halb.health._probe",
            ["halb/health/_probe.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
