"""Lease timing logic with a fake clock: when a node may hold/refresh the VIP, and when not."""
from __future__ import annotations

import pytest

from halb.announce.lease import LeaseKeeper, LeaseParams
from halb.announce.settings import AnnounceConfigError, parse_announce

P = LeaseParams()  # L = 1.5, renew 0.15, wait = 1.5 * 1.02 + 0.05 = 1.58
OK_FIRST = {"ok": True, "epoch": 1, "first": True, "handover_from": None}
OK = {"ok": True, "epoch": 1, "first": False, "handover_from": None}


def leader_at(t: float, created: float = 0.0, params: LeaseParams = P) -> LeaseKeeper:
    k = LeaseKeeper(params, created_at=created)
    assert k.set_leader(True, t)
    return k


def renew(k: LeaseKeeper, submit: float, commit: float, result: dict | None = None, ok: bool = True) -> bool:
    tok = k.begin_renewal(f"c{submit}", submit)
    k.on_renewal_applied(tok.cid, commit)
    return k.on_renewal_result(tok, ok, result or OK, commit)


def test_fresh_cluster_waits_from_keeper_creation() -> None:
    k = leader_at(0.0)
    assert renew(k, 0.0, 0.05, OK_FIRST)
    assert not k.may_hold(0.06)          # nothing known about earlier holders: wait
    for i in range(1, 12):               # keep renewing every 150 ms
        renew(k, i * 0.15, i * 0.15 + 0.02)
    assert not k.may_hold(1.57)
    assert k.may_hold(1.6) and k.may_refresh(1.6)


def test_lease_end_is_submit_time_plus_L_not_commit_time() -> None:
    k = leader_at(10.0, created=0.0)
    assert renew(k, 10.0, 10.9, OK_FIRST)  # slow commit
    assert k.lease_end == pytest.approx(11.5)
    assert k.may_hold(11.49) and not k.may_hold(11.5)
    # refresh only with > 1.3 s of lease left: never for this slow renewal
    assert not k.may_refresh(10.9)


def test_refresh_window_and_post_check() -> None:
    k = leader_at(10.0)
    renew(k, 10.0, 10.02, OK_FIRST)
    assert k.may_refresh(10.19) and not k.may_refresh(10.201)
    assert k.refresh_was_safe(10.29) and not k.refresh_was_safe(10.31)


def test_successor_waits_from_last_foreign_renewal_applied() -> None:
    k = LeaseKeeper(P, created_at=0.0)
    for t in (5.0, 5.15, 5.3):             # the old leader's renewals, applied here as follower
        k.on_renewal_applied(f"old{t}", t)
    k.set_leader(True, 6.0)                # we win later (the election took 0.7 s)
    renew(k, 6.0, 6.05, OK_FIRST)
    renew(k, 6.75, 6.8)
    assert not k.may_hold(6.85)            # 5.3 + 1.58 = 6.88
    assert k.may_hold(6.89)


def test_textbook_rule_waits_from_election() -> None:
    params = LeaseParams(wait_from="election")
    k = LeaseKeeper(params, created_at=0.0)
    k.on_renewal_applied("old", 5.3)
    k.set_leader(True, 6.0)
    for i in range(12):
        renew(k, 6.0 + i * 0.15, 6.02 + i * 0.15, OK_FIRST if i == 0 else OK)
    assert not k.may_hold(7.57) and k.may_hold(7.59)


def test_old_entries_applied_after_winning_push_the_wait() -> None:
    k = LeaseKeeper(P, created_at=0.0)
    k.set_leader(True, 6.0)
    k.on_renewal_applied("old-uncommitted-at-win", 6.03)  # committed by our term, applied now
    renew(k, 6.0, 6.04, OK_FIRST)
    assert k.wait_until() == pytest.approx(6.03 + 1.58)


def test_own_renewals_do_not_push_the_wait_but_other_epochs_do() -> None:
    k = leader_at(0.0)
    for i in range(20):
        renew(k, i * 0.15, i * 0.15 + 0.02, OK_FIRST if i == 0 else OK)
    assert k.wait_until() == pytest.approx(1.58)
    # an answer-less renewal from this epoch, applied after we lost leadership: foreign now
    tok = k.begin_renewal("late", 3.0)
    k.set_leader(False, 3.1)
    k.on_renewal_applied(tok.cid, 3.2)
    assert k.seen_at == pytest.approx(3.2)


def test_snapshot_load_counts_as_seeing_a_renewal() -> None:
    k = LeaseKeeper(P, created_at=0.0)
    k.on_snapshot_loaded(4.0)
    k.set_leader(True, 4.5)
    renew(k, 4.5, 4.55, OK_FIRST)
    assert k.wait_until() == pytest.approx(5.58)


def test_planned_handover_skips_the_wait_only_on_first_result() -> None:
    k = LeaseKeeper(P, created_at=0.0)
    k.on_renewal_applied("old", 5.0)
    k.set_leader(True, 5.05)
    renew(k, 5.05, 5.08, {"ok": True, "epoch": 2, "first": True, "handover_from": "n1"})
    assert k.handover and k.may_hold(5.09) and k.may_refresh(5.09)
    # handover_from echoed on a later renewal of an epoch we did not start: no skip
    k2 = LeaseKeeper(P, created_at=0.0)
    k2.on_renewal_applied("old", 5.0)
    k2.set_leader(True, 5.05)
    renew(k2, 5.05, 5.08, {"ok": True, "epoch": 2, "first": False, "handover_from": "n1"})
    assert not k2.handover and not k2.may_hold(5.09)


def test_stale_and_failed_callbacks_never_extend() -> None:
    k = leader_at(10.0)
    t1 = k.begin_renewal("a", 10.0)
    t2 = k.begin_renewal("b", 10.15)
    assert k.on_renewal_result(t2, True, OK_FIRST, 10.2)
    assert not k.on_renewal_result(t1, True, OK, 10.21)      # older than current lease_start
    assert k.lease_start == 10.15
    t3 = k.begin_renewal("c", 10.3)
    assert not k.on_renewal_result(t3, False, None, 10.35)  # DISCARDED etc.
    assert not k.on_renewal_result(t3, True, {"ok": False}, 10.35)
    # a callback from a previous leadership epoch arriving after re-election
    t4 = k.begin_renewal("d", 10.45)
    k.set_leader(False, 10.5)
    k.set_leader(True, 11.0)
    assert not k.on_renewal_result(t4, True, OK, 11.01)
    assert k.lease_start is None and not k.may_hold(11.01)


def test_frozen_leader_resuming_gets_nothing_from_old_results() -> None:
    k = leader_at(0.0)
    for i in range(15):
        renew(k, i * 0.15, i * 0.15 + 0.02, OK_FIRST if i == 0 else OK)
    assert k.may_hold(2.2)
    tok = k.begin_renewal("before-freeze", 2.25)
    # frozen 5 s; on resume pysyncobj still says leader for a moment and the result arrives
    assert k.on_renewal_result(tok, True, OK, 7.3)   # newer submit -> accepted, but...
    assert not k.may_hold(7.3)                        # ...2.25 + 1.5 is long past
    assert not k.may_refresh(7.3)


def test_partitioned_leader_lease_lapses_without_callbacks() -> None:
    k = leader_at(0.0)
    for i in range(15):
        renew(k, i * 0.15, i * 0.15 + 0.02, OK_FIRST if i == 0 else OK)
    last = 14 * 0.15
    for i in range(1, 20):                  # renewals keep being submitted, never answered
        k.begin_renewal(f"p{i}", last + i * 0.15)
    assert k.may_hold(last + 1.49) and not k.may_hold(last + 1.5)
    assert not k.may_refresh(last + 0.21)   # and the kernel drops the VIP before lease end


def test_handover_pause_stops_renewals_and_holding() -> None:
    k = leader_at(0.0)
    for i in range(15):
        renew(k, i * 0.15, i * 0.15 + 0.02, OK_FIRST if i == 0 else OK)
    tok = k.begin_renewal("inflight", 2.25)
    k.begin_handover(2.26)
    assert not k.may_hold(2.27) and not k.renew_due(2.5)
    assert not k.on_renewal_result(tok, True, OK, 2.3)
    k.end_handover()
    assert k.renew_due(2.5)


def test_renew_pacing_and_outstanding_limit() -> None:
    k = leader_at(0.0, params=LeaseParams(max_outstanding=3))
    assert k.renew_due(0.0)
    k.begin_renewal("a", 0.0)
    assert not k.renew_due(0.1) and k.renew_due(0.15)
    k.begin_renewal("b", 0.15)
    k.begin_renewal("c", 0.3)
    assert not k.renew_due(0.45)            # three unanswered
    assert k.renew_due(5.2)                 # the old ones stopped counting


def test_follower_never_holds() -> None:
    k = LeaseKeeper(P, created_at=0.0)
    assert not k.may_hold(100.0) and not k.renew_due(100.0)


def test_params_check() -> None:
    assert LeaseParams().check() == []
    assert LeaseParams(lease_s=1.0).check()
    assert LeaseParams(kernel_expiry_max_s=1.0).check()
    assert LeaseParams(wait_from="x").check()


def test_parse_announce_modes_and_errors(tmp_path) -> None:
    assert parse_announce({}).mode == "none"
    v = parse_announce({"mode": "vip", "vip": "10.99.0.10/32", "interface": "eth0",
                        "notify_master": "m.sh"}, tmp_path)
    assert v.vip == "10.99.0.10" and v.notify_master == str(tmp_path / "m.sh")
    d = parse_announce({"mode": "dns", "bind": "10.0.0.1:53", "name": "checkout"}, listen_host="10.0.0.1")
    assert d.address == "10.0.0.1" and d.names == ["checkout"] and d.answer == "leader"
    bad = [
        ({"mode": "vip", "interface": "eth0"}, "vip"),
        ({"mode": "vip", "vip": "10.0.0.0/24", "interface": "eth0"}, "vip"),
        ({"mode": "vip", "vip": "x", "interface": "eth0"}, "vip"),
        ({"mode": "vip", "vip": "10.0.0.1", "interface": "eth0", "lease_s": 1.0}, "lease_s"),
        ({"mode": "vip", "vip": "10.0.0.1", "interface": "eth0", "zone": "x"}, "zone"),
        ({"mode": "dns", "bind": "10.0.0.1", "name": "x", "address": "10.0.0.1"}, "bind"),
        ({"mode": "dns", "bind": "10.0.0.1:53", "address": "10.0.0.1"}, "names"),
        ({"mode": "dns", "bind": "10.0.0.1:53", "name": "x"}, "address"),
        ({"mode": "dns", "bind": "10.0.0.1:53", "name": "x", "address": "10.0.0.1", "answer": "some"}, "answer"),
        ({"mode": "carrier-pigeon"}, "mode"),
        ({"mode": "none", "vip": "10.0.0.1"}, "vip"),
    ]
    for raw, key in bad:
        with pytest.raises(AnnounceConfigError) as ei:
            parse_announce(raw)
        assert ei.value.key == key, (raw, str(ei.value))


def test_state_machine_rejects_renewals_from_an_older_term() -> None:
    """pysyncobj forwards a deposed leader's queued commands to the new leader: they must not
    move the lease back."""
    from halb.control.state import ClusterState

    cs = ClusterState()

    def renew_cmd(holder: str, term: int, cid: str) -> dict:
        return cs.apply({"op": "lease.renew", "args": {"holder": holder, "term": term}, "id": cid,
                         "by": "t", "node": holder, "at": 0}).result

    assert renew_cmd("n2", 5, "a")["first"] is True
    stale = renew_cmd("n3", 4, "b")
    assert stale["ok"] is False and cs.lease["holder"] == "n2"
    assert renew_cmd("n2", 5, "c")["first"] is False
    assert renew_cmd("n3", 6, "d")["epoch"] == 2 and cs.lease["term"] == 6


def test_log_change_as_follower_bounds_the_wait() -> None:
    """The old holder's last renewal reached our log at 5.3 but its commit did not: we apply
    it only after winning at 6.0; the log-change time still starts our clock at 5.3."""
    k = LeaseKeeper(P, created_at=0.0, track_log=True)
    k.on_renewal_applied("old", 5.15)
    k.on_log_changed(5.3)
    k.set_leader(True, 6.0)
    k.on_renewal_applied("old-last", 6.03)   # in our log since 5.3, applied after winning
    renew(k, 6.0, 6.04, OK_FIRST)
    assert k.wait_until() == pytest.approx(5.3 + 1.58)
    # without log tracking the apply time after winning counts (the safe fallback)
    k2 = LeaseKeeper(P, created_at=0.0)
    k2.on_renewal_applied("old", 5.15)
    k2.set_leader(True, 6.0)
    k2.on_renewal_applied("old-last", 6.03)
    renew(k2, 6.0, 6.04, OK_FIRST)
    assert k2.wait_until() == pytest.approx(6.03 + 1.58)
    # as a follower, applies count either way
    k3 = LeaseKeeper(P, created_at=0.0, track_log=True)
    k3.on_renewal_applied("x", 7.0)
    assert k3.seen_at == 7.0


def test_applies_right_after_a_win_use_rafts_view() -> None:
    """Raft won at 6.0; the keeper hears of it at 6.02; the predecessor's last entry is
    applied at 6.01 (no-op commit). With log tracking it must not restart the wait."""
    k = LeaseKeeper(P, created_at=0.0, track_log=True)
    k.on_log_changed(5.3)
    k.on_renewal_applied("old-last", 6.01, raft_leader=True)
    k.set_leader(True, 6.02)
    renew(k, 6.02, 6.05, OK_FIRST)
    assert k.wait_until() == pytest.approx(5.3 + 1.58)


def test_failed_log_tracking_falls_back_to_the_full_wait() -> None:
    """The tick callback that notes log changes failed: a change may be unnoted, so the
    shortened wait (from 5.3) is not known to be safe. Wait from the election (6.0) and
    count foreign renewals applied while leading; a successful follower tick ends it."""
    k = LeaseKeeper(P, created_at=0.0, track_log=True)
    k.on_log_changed(5.3)
    k.set_log_tracking_failed(True)
    k.set_leader(True, 6.0)
    renew(k, 6.0, 6.04, OK_FIRST)
    assert k.wait_until() == pytest.approx(6.0 + 1.58)
    renew(k, 7.0, 7.03)
    assert not k.may_hold(7.05)                # 5.3 + 1.58 has passed, 6.0 + 1.58 has not
    k.on_renewal_applied("foreign", 6.2)       # counts again while leading
    assert k.wait_until() == pytest.approx(6.2 + 1.58)
    # the same history with tracking intact keeps the shortened wait
    k2 = LeaseKeeper(P, created_at=0.0, track_log=True)
    k2.on_log_changed(5.3)
    k2.set_leader(True, 6.0)
    k2.on_renewal_applied("foreign", 6.2)
    assert k2.wait_until() == pytest.approx(5.3 + 1.58)
    k.set_log_tracking_failed(False)
    assert not k.log_tracking_failed and k._log_tracked()
