"""fdlimit (RLIMIT_NOFILE -> default max_connections) and local_errors (what is not a backend's fault)."""
from __future__ import annotations

import errno
import resource
import subprocess
import sys

from halb.dataplane.fdlimit import default_max_connections, reserve
from halb.dataplane.local_errors import is_local_resource_error, local_reason
from halb.dataplane.options import ServiceOptions
from halb.dataplane.snapshot import ServiceRoute


def test_default_max_connections_leaves_two_fds_per_connection_and_a_reserve() -> None:
    assert default_max_connections(1024) == (1024 - 102) // 2
    assert default_max_connections(256) == (256 - 64) // 2
    for n in (64, 256, 1024, 65536, 1048576):
        assert 2 * default_max_connections(n) + reserve(n) <= n or n <= reserve(n) + 2


def route(**options: object) -> ServiceRoute:
    return ServiceRoute(name="s", mode="http", listen_host="127.0.0.1", listen_port=0, algorithm="round_robin",
                        hash_key="source", backends=(), options=tuple(sorted(options.items())))


def test_unset_max_connections_is_derived_explicit_values_win() -> None:
    assert ServiceOptions.from_route(route()).max_connections == default_max_connections()
    assert ServiceOptions.from_route(route(max_connections=7)).max_connections == 7
    assert ServiceOptions.from_route(route(max_connections=0)).max_connections == 0  # explicit: unlimited


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = ("import resource; from halb.dataplane.fdlimit import raise_nofile; "
            "print(raise_nofile(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096)

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, want))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=low, timeout=30)
    assert out.stdout.split() == [str(want), str(want)], out.stderr


def test_local_resource_errors_are_told_apart() -> None:
    for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        assert is_local_resource_error(OSError(e, "x"))
    for e in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ECONNRESET):
        assert not is_local_resource_error(OSError(e, "x"))
    assert not is_local_resource_error(TimeoutError())
    assert "out of file descriptors" in local_reason(OSError(errno.EMFILE, "Too many open files"))
