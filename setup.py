"""Build hook for halb's two optional C extensions; all metadata lives in pyproject.toml.

halb.dataplane._fasthttp speeds up the HTTP proxy's head handling; halb.dataplane._tcprelay
relays TCP mode's connections below Python (Linux epoll). Both are optional: where no C
compiler is available (or, for the relay, no epoll) the build skips them and the proxy uses
its pure-Python paths (llhttp through httptools; asyncio Protocols for TCP mode).
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
            "halb.dataplane._tcprelay",
            ["halb/dataplane/_tcprelay.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
