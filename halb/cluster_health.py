"""Cluster health as one word, for `halb cluster status` and scripts.

"ok" hides a lost balancer: with one of three down the cluster still has quorum but can
lose no further member. So the status says, from the answering node's point of view:

  - "no_quorum": this node does not see a majority of the voters (it cannot commit);
  - "degraded": a voter is unreachable; the cluster tolerates fewer losses than it was
    built for (with three members: none);
  - "ok": every voter is connected.

It also hides a dead leader: pysyncobj keeps naming the old leader until the election
timeout, so the status names a leader only when this node is it or is connected to it.
"""
from __future__ import annotations

from typing import Any


def assess(members: list[dict[str, Any]], has_quorum: bool) -> dict[str, Any]:
    """members: ClusterViews.members_view() rows (halb/api/views.py) (in_raft_config, connected, id, raft)."""
    voters = [m for m in members if m.get("in_raft_config")]
    up = [m for m in voters if m.get("connected")]
    down = [m.get("id") or m.get("raft") for m in voters if not m.get("connected")]
    quorum = len(voters) // 2 + 1
    if not has_quorum or len(up) < quorum:
        health = "no_quorum"
    elif down:
        health = "degraded"
    else:
        health = "ok"
    return {"health": health, "voters": len(voters), "voters_connected": len(up), "quorum": quorum,
            "tolerates": max(0, len(up) - quorum), "down": sorted(down)}


def visible_leader(leader_raft: str | None, self_addr: str, partners: dict[str, bool]) -> str | None:
    """The leader's Raft address only if this node is the leader or is connected to it."""
    if leader_raft is None:
        return None
    if leader_raft == self_addr or partners.get(leader_raft):
        return leader_raft
    return None


def shared_addresses(listen: str, shared_hosts: list[str]) -> list[str]:
    """host:port on every shared host for a service listening on `listen` (host:port)."""
    if not listen or not shared_hosts:
        return []
    port = listen.rsplit(":", 1)[1]
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in shared_hosts]
