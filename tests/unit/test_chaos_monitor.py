"""The chaos monitor reads the real field names of the status a node serves."""
from __future__ import annotations

import pytest

from halb.chaos.monitor import _node_view, _vip_held
from tests.unit.test_announce_manager import drive, make


def node_status(ann) -> dict:
    """The parts of the status view (halb/api/views.py) the monitor reads, with the real announce status."""
    return {"node": "n1", "leader": "n1", "raft_state": "leader", "term": 1, "has_quorum": True,
            "members": [{"id": "n1", "raft": "127.0.0.1:1"}], "announce": ann.status()}


def test_vip_held_follows_holds_vip_not_the_replicated_lease_holder() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)
    assert _vip_held(node_status(ann)) is True
    raft.leader = False                        # lost leadership: the VIP is deleted at once ...
    drive(ann, clock, 0.025)
    st = node_status(ann)
    assert st["announce"]["holder"] == "n1"    # ... while the replicated lease still names n1
    assert _vip_held(st) is False


def test_no_vip_in_modes_none_and_dns() -> None:
    assert _vip_held({"announce": {"mode": "none"}}) is None
    assert _vip_held({"announce": {"mode": "dns", "holds_vip": True}}) is None


def test_a_status_without_the_fields_is_an_error_not_a_guess() -> None:
    with pytest.raises(KeyError):
        _vip_held({"vip_held": True})
    with pytest.raises(KeyError):
        _vip_held({"announce": {"mode": "vip", "holder": "n1"}})
    with pytest.raises(TypeError):
        _vip_held({"announce": {"mode": "vip", "holds_vip": "n1"}})
    with pytest.raises(KeyError):
        _node_view({"leader": "n1", "members": []}, 0.0)
