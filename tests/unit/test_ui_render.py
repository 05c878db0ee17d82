"""The status page renderer (halb/api/ui_render.py): every value from the cluster is escaped,
and each member's role is read the way the status view reports it."""
from __future__ import annotations

from halb.api.ui_render import Snapshot, member_role, render_live, render_login, render_status_page

EVIL = '<script>alert("x")</script>&\'"'


def snapshot(text: str) -> Snapshot:
    """A snapshot shaped like ClusterViews' output, with `text` in every free-text field."""
    member = {"id": "n1", "raft": "127.0.0.1:7100", "api": "127.0.0.1:7000", "self": True, "leader": True,
              "in_raft_config": True, "connected": True, "raft_state": "leader", "dataplane_ok": False,
              "dataplane_reason": text}
    status = {"node": "n1", "leader": "n1", "term": 2, "raft_state": "leader", "commit_index": 9, "health": "ok",
              "health_detail": {"voters": 1, "voters_connected": 1, "quorum": 1, "tolerates": 0},
              "members": [member], "last_event": 1,
              "services": [{"name": "checkout", "listen": ["127.0.0.1:8080"], "routing": "error", "warnings": [text]}],
              "announce": {"mode": "vip", "vip": text, "holder": "n1", "epoch": 3}}
    service = {"name": "checkout", "mode": "http", "algorithm": text, "listen_nodes": ["127.0.0.1:8080"]}
    backend = {"service": "checkout", "name": "A", "address": "127.0.0.1:9000", "server": text, "weight": 100,
               "admin_state": "drain", "verdict": "up", "observations": {"n1": "up"}, "local": {"state": "up"},
               "in_flight": 0, "requests": 5}
    report = {"service": "checkout", "status": "ok", "instances": 1, "healthy_instances": 1, "servers": ["a"],
              "servers_healthy": ["a"], "survives_server_loss": False, "n_plus_one": None}
    event = {"seq": 1, "at": 1.7e9, "kind": "backend.drain", "message": text, "by": text, "node": "n1"}
    return Snapshot(status, [service], [backend], {"checkout": report}, [event], at=1.7e9)


def test_every_cluster_value_is_escaped() -> None:
    html = render_status_page(snapshot(EVIL), who=EVIL, role="read")
    assert "<script>alert" not in html and EVIL not in html
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;"
    # the data-plane reason, VIP, warning, algorithm, server, event message and by, the signed-in name
    assert html.count(escaped) == 8, html.count(escaped)
    assert html.count("<script") == 1 and '<script src="/ui/static/app.js" defer></script>' in html


def test_live_fragment_carries_the_test_hooks() -> None:
    html = render_live(snapshot("x"))
    assert 'data-member="n1" data-role="leader"' in html
    assert 'data-backend="checkout/A" data-admin-state="drain" data-verdict="up"' in html
    assert 'data-kind="backend.drain"' in html and 'id="leader" data-leader="n1"' in html
    assert "<html" not in html  # a fragment, swapped into the page


def test_login_form_never_carries_a_value() -> None:
    html = render_login(EVIL, node="n1")
    assert 'name="token"' in html and "value=" not in html and "<script>alert" not in html


def test_member_role_as_the_answering_node_sees_it() -> None:
    base = {"self": False, "leader": False, "in_raft_config": True, "connected": True}
    assert member_role({**base, "leader": True}) == "leader"
    assert member_role(base) == "follower"
    assert member_role({**base, "connected": False}) == "unreachable"
    assert member_role({**base, "in_raft_config": False}) == "not in raft config"
    assert member_role({**base, "self": True, "raft_state": "candidate", "connected": True}) == "candidate"


def test_thousands_of_backends_list_those_needing_attention_first() -> None:
    from halb.api.ui_render import rows_shown

    rows = [{"name": f"b{i}", "verdict": "up", "admin_state": "active"} for i in range(1000)]
    rows[700]["verdict"] = "down"
    rows[900]["admin_state"] = "drain"
    shown = rows_shown(rows, limit=50)
    assert len(shown) == 50 and rows[700] in shown and rows[900] in shown
    assert [r["name"] for r in shown] == sorted((r["name"] for r in shown), key=lambda n: int(n[1:]))  # usual order
    assert rows_shown(rows[:10], limit=50) == rows[:10]
    snap = snapshot("x")
    snap.backends = [dict(snap.backends[0], name=f"b{i}", admin_state="active") for i in range(205)]
    html = render_live(snap)
    assert html.count("data-backend=") == 200 and "5 more backends not shown (0 of them not up or not active)" in html


def test_the_page_lists_at_most_max_page_rows_backends_those_at_risk_first() -> None:
    """10,000 backends (100 services of 100): every row listed was a 5.9 MB fragment taking
    77 ms of the node's loop per poll; the page lists MAX_PAGE_ROWS, service by service in
    the page's order, and says how many it left out and how to list them."""
    from halb.api import ui_render

    snap = snapshot("x")
    svc, be, rep = snap.services[0], snap.backends[0], snap.resilience["checkout"]
    names = [f"svc{i:03d}" for i in range(100)]
    snap.services = [dict(svc, name=n) for n in names]
    snap.resilience = {n: dict(rep, service=n) for n in names}
    snap.backends = [dict(be, service=n, name=f"b{j:03d}", admin_state="active", verdict="down" if j == 99 else "up")
                     for n in names for j in range(100)]
    snap.status["services"] = [{"name": n, "listen": [], "routing": "ok", "warnings": []} for n in names]
    html = render_live(snap)
    assert html.count("data-backend=") == ui_render.MAX_PAGE_ROWS == 1000
    for n in names[:10]:  # the first ten services are listed whole, their down backend included
        assert f'data-backend="{n}/b099" data-admin-state="active" data-verdict="down"' in html
    assert 'data-backend="svc010/' not in html and html.count("not listed: the page lists at most 1,000") == 90
    assert "100 more backends not shown (1 of them not up or not active): <code>halb backend list -s svc099</code>" in html
    assert len(html) < 1_000_000
