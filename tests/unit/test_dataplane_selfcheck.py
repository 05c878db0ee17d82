"""The data plane self-check's decisions (halb/dataplane/selfcheck.py), on a fake clock."""
from __future__ import annotations

from halb.dataplane.selfcheck import DataPlaneCheck, SelfCheckParams

P = SelfCheckParams(bind_grace_s=0.3, max_worker_deaths=3, worker_window_s=30.0, recover_s=2.0)


def test_node_without_services_is_healthy() -> None:
    c = DataPlaneCheck(P)
    assert c.evaluate([], {}, [], 0.0).ok
    assert c.evaluate([], {}, [], 100.0).ok


def test_all_bound_is_healthy() -> None:
    c = DataPlaneCheck(P)
    assert c.evaluate(["a", "b"], {}, [], 0.0).ok


def test_unbound_listener_fails_only_after_grace() -> None:
    c = DataPlaneCheck(P)
    assert c.evaluate(["a"], {"a": "Address already in use"}, [], 10.0).ok
    assert c.evaluate(["a"], {"a": "Address already in use"}, [], 10.25).ok
    v = c.evaluate(["a"], {"a": "Address already in use"}, [], 10.35)
    assert not v.ok and v.failing_since == 10.35
    assert "service a not listening" in v.reason and "Address already in use" in v.reason


def test_unbound_service_that_is_not_expected_is_ignored() -> None:
    c = DataPlaneCheck(P)
    c.evaluate(["a"], {"gone": "x"}, [], 0.0)
    assert c.evaluate(["a"], {"gone": "x"}, [], 5.0).ok


def test_bound_in_time_resets_the_grace() -> None:
    c = DataPlaneCheck(P)
    c.evaluate(["a"], {"a": "x"}, [], 0.0)
    assert c.evaluate(["a"], {}, [], 0.2).ok
    assert c.evaluate(["a"], {"a": "x"}, [], 0.4).ok  # a new failure starts its own grace
    assert not c.evaluate(["a"], {"a": "x"}, [], 0.75).ok


def test_worker_deaths_fail_at_the_limit_within_window() -> None:
    c = DataPlaneCheck(P)
    assert c.evaluate(["a"], {}, [1.0, 2.0], 3.0).ok
    v = c.evaluate(["a"], {}, [1.0, 2.0, 2.5], 3.0)
    assert not v.ok and "3 worker process deaths" in v.reason


def test_old_worker_deaths_do_not_count() -> None:
    c = DataPlaneCheck(P)
    assert c.evaluate(["a"], {}, [1.0, 2.0, 40.0], 40.5).ok


def test_recovery_needs_recover_s_clear_and_reports_recovering() -> None:
    c = DataPlaneCheck(P)
    c.evaluate(["a"], {"a": "x"}, [], 0.0)
    assert not c.evaluate(["a"], {"a": "x"}, [], 1.0).ok
    v = c.evaluate(["a"], {}, [], 1.1)
    assert not v.ok and v.reason.startswith("recovering") and v.failing_since == 1.0
    assert not c.evaluate(["a"], {}, [], 3.0).ok
    assert c.evaluate(["a"], {}, [], 3.1).ok


def test_failure_during_recovery_restarts_the_recovery_clock() -> None:
    c = DataPlaneCheck(P)
    c.evaluate(["a"], {"a": "x"}, [], 0.0)
    c.evaluate(["a"], {"a": "x"}, [], 1.0)
    c.evaluate(["a"], {}, [], 1.5)
    c.evaluate(["a"], {"a": "x"}, [], 2.0)          # unbound again: new grace, still failing
    assert not c.evaluate(["a"], {}, [], 3.0).ok     # clear since 3.0 only
    assert not c.evaluate(["a"], {}, [], 4.9).ok
    assert c.evaluate(["a"], {}, [], 5.0).ok


def test_disabled_check_is_always_ok() -> None:
    c = DataPlaneCheck(SelfCheckParams(enabled=False))
    assert c.evaluate(["a"], {"a": "x"}, [0.0] * 10, 100.0).ok


def test_params_check_rejects_nonsense() -> None:
    assert SelfCheckParams().check() == []
    assert SelfCheckParams(max_worker_deaths=0).check()
    assert SelfCheckParams(worker_window_s=0).check()
    assert SelfCheckParams(bind_grace_s=-1).check()


def test_announce_table_knobs_parse_and_bad_values_are_named() -> None:
    import pytest

    from halb.announce.settings import AnnounceConfigError, parse_announce

    base = {"mode": "dns", "bind": "127.0.0.1:5353", "names": ["x"], "address": "127.0.0.1"}
    cfg = parse_announce({**base, "dataplane_bind_grace_s": 0.5, "dataplane_worker_deaths": 5,
                          "dataplane_holddown_s": 7.0, "dataplane_check": False})
    assert cfg.dataplane.bind_grace_s == 0.5 and cfg.dataplane.max_worker_deaths == 5
    assert cfg.dataplane_holddown_s == 7.0 and cfg.dataplane.enabled is False
    assert parse_announce(base).dataplane == SelfCheckParams()
    with pytest.raises(AnnounceConfigError, match="dataplane_worker_deaths must be >= 1"):
        parse_announce({**base, "dataplane_worker_deaths": 0})
    with pytest.raises(AnnounceConfigError, match="dataplane_holddown_s"):
        parse_announce({**base, "dataplane_holddown_s": -1.0})


def test_engine_reports_a_service_whose_port_is_taken_as_unbound() -> None:
    """Real sockets: the data plane's own view of a failed bind feeds the check."""
    import asyncio
    import socket

    from halb.dataplane.engine import DataPlane
    from halb.dataplane.testing import service, snapshot

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]

    async def main() -> None:
        dp = DataPlane("t")
        await dp.start(snapshot(service("ok", [("127.0.0.1", 9)]), service("taken", [("127.0.0.1", 9)], port=port)))
        try:
            expected, unbound, deaths = dp.selfcheck_inputs()
            assert expected == {"ok", "taken"} and deaths == []
            assert list(unbound) == ["taken"] and "in use" in unbound["taken"]
            c = DataPlaneCheck(P)
            c.evaluate(expected, unbound, deaths, 0.0)
            assert not c.evaluate(expected, unbound, deaths, 0.5).ok
            dp.update(snapshot(service("ok", [("127.0.0.1", 9)]), version=2))  # the broken one removed
            assert dp.selfcheck_inputs()[1] == {}
        finally:
            await dp.stop()

    try:
        asyncio.run(main())
    finally:
        blocker.close()
