"""The status page's HTML: one snapshot of this node's views, rendered once, here only.

Both the first page and the fragment the page polls every second (`/ui/live`) come from
`render_live`, so there is one renderer and one place that escapes: every value from the
cluster (names, addresses, event messages, which an operator with a token can choose) goes
through `_e`. The data comes from the same `ClusterViews` methods that answer the JSON API
(`halb/api/views.py`); nothing here reads the replicated state itself.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any, Iterable

EVENTS_SHOWN = 15
MAX_BACKEND_ROWS = 200  # per service; the rest is counted, not listed (rows_shown)
# per page, over all services in the page's order (services at risk first): at 10,000
# backends every row listed made a 5.9 MB fragment that took 77 ms of the node's event loop
# to render, at each poll of each open page; 1,000 rows are ~0.6 MB and ~8 ms
MAX_PAGE_ROWS = 1000


@dataclass
class Snapshot:
    """What the page shows, read from one node's views at one moment."""

    status: dict[str, Any]  # ClusterViews.status_view()
    services: list[dict[str, Any]]  # ClusterViews.services_view()
    backends: list[dict[str, Any]]  # ClusterViews.backends_view(None)
    resilience: dict[str, dict[str, Any]]  # service -> ClusterViews.resilience_view() report
    events: list[dict[str, Any]]  # newest first
    at: float


def take_snapshot(views: Any, events: int = EVENTS_SHOWN) -> Snapshot:
    status = views.status_view()
    last = int(status.get("last_event") or 0)
    recent = views.events_view(max(0, last - events), events)
    return Snapshot(status=status, services=views.services_view(), backends=views.backends_view(None),
                    resilience={r["service"]: r for r in views.resilience_view(None)},
                    events=list(reversed(recent)), at=time.time())


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _utc(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _badge(word: Any, tone: str | None = None) -> str:
    """A coloured word; the tone (ok/warn/bad/info/off) defaults from the word itself."""
    text = "-" if word is None else str(word)
    tone = tone or TONES.get(text, "info")
    return f'<span class="badge {tone}">{_e(text)}</span>'


TONES = {
    "ok": "ok", "up": "ok", "active": "ok", "leader": "ok", "yes": "ok", "survives": "ok", "connected": "ok",
    "follower": "info", "pending": "warn", "drain": "warn", "degraded": "warn", "at_risk": "warn",
    "held": "warn", "candidate": "warn", "maint": "off", "no": "off", "none": "off",
    "down": "bad", "no_quorum": "bad", "unreachable": "bad", "overloaded": "bad", "failing": "bad",
}


def _table(headers: Iterable[str], rows: list[str], cls: str, empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def member_role(m: dict[str, Any]) -> str:
    """The member's Raft role as the answering node sees it: its own state for itself; for
    a peer, leader (the status view's visible leader), follower while connected, else
    unreachable (the JSON API says the same in `leader`, `connected`, `raft_state`)."""
    if m.get("leader"):
        return "leader"
    if m.get("self"):
        return str(m.get("raft_state") or "unknown")
    if not m.get("in_raft_config"):
        return "not in raft config"
    return "follower" if m.get("connected") else "unreachable"


def _summary(snap: Snapshot) -> str:
    st = snap.status
    detail = st.get("health_detail") or {}
    health = st.get("health") or "unknown"
    ann = st.get("announce") or {"mode": "none"}
    mode = ann.get("mode") or "none"
    if mode == "none":
        holder = _badge("none", "off") + ' <span class="muted">(no VIP or DNS announcement configured)</span>'
    else:
        what = f"VIP {ann['vip']}" if ann.get("vip") else f"{mode} announcement"
        holder = (f'<strong id="vip-holder" data-holder="{_e(ann.get("holder") or "")}">{_e(ann.get("holder") or "nobody")}</strong>'
                  f' <span class="muted">{_e(what)}, lease epoch {_e(ann.get("epoch"))}</span>')
    leader = st.get("leader")
    leader_html = (f'<strong id="leader" data-leader="{_e(leader)}">{_e(leader)}</strong>' if leader
                   else '<strong id="leader" data-leader="">none visible</strong>')
    cards = [
        ("Leader", f'{leader_html} <span class="muted">term {_e(st.get("term"))}</span>'),
        ("VIP / announcement holder", holder),
        ("Cluster health", f'{_badge(health)} <span class="muted">{_e(detail.get("voters_connected"))} of '
                           f'{_e(detail.get("voters"))} voters connected, quorum {_e(detail.get("quorum"))}, '
                           f'tolerates {_e(detail.get("tolerates"))} more loss</span>'),
        ("Answered by", f'<strong id="answered-by">{_e(st.get("node"))}</strong> '
                        f'<span class="muted">({_e(st.get("raft_state"))}, commit {_e(st.get("commit_index"))}, '
                        f'as of {_e(_utc(snap.at))})</span>'),
    ]
    items = "".join(f'<div class="card"><h3>{_e(t)}</h3><div>{body}</div></div>' for t, body in cards)
    return f'<section class="cards">{items}</section>'


def _members(snap: Snapshot) -> str:
    rows = []
    for m in snap.status.get("members", []):
        ident = m.get("id") or m.get("raft")
        role = member_role(m)
        voter = "yes" if m.get("in_raft_config") else "no"
        conn = "self" if m.get("self") else ("connected" if m.get("connected") else "unreachable")
        dp = {True: "ok", False: "failing", None: "-"}.get(m.get("dataplane_ok"), "-")
        dp_cell = _badge(dp, "info" if dp == "-" else None)
        if m.get("dataplane_ok") is False and m.get("dataplane_reason"):
            dp_cell += f' <span class="muted">{_e(m["dataplane_reason"])}</span>'
        rows.append(f'<tr data-member="{_e(ident)}" data-role="{_e(role)}"><td><strong>{_e(ident)}</strong></td>'
                    f"<td>{_badge(role)}</td><td>{_badge(voter)}</td>"
                    f"<td>{_badge(conn, 'info' if conn == 'self' else None)}</td><td>{dp_cell}</td>"
                    f"<td><code>{_e(m.get('raft'))}</code></td><td><code>{_e(m.get('api') or '-')}</code></td></tr>")
    table = _table(["Member", "Raft role", "Voter", "Link", "Data plane", "Raft address", "API address"],
                   rows, "members", "no members known")
    return (f'<section id="members"><h2>Members <span class="muted">({len(rows)}, roles as '
            f'{_e(snap.status.get("node"))} sees them)</span></h2>{table}</section>')


def _resilience_line(report: dict[str, Any] | None) -> str:
    if not report:
        return _badge("unknown", "info")
    status = report.get("status", "unknown")
    parts = [f"{report.get('healthy_instances', 0)} of {report.get('instances', 0)} instances healthy on "
             f"{len(report.get('servers_healthy') or [])} of {len(report.get('servers') or [])} servers",
             "survives losing any one server" if report.get("survives_server_loss")
             else "does NOT survive losing a server"]
    n1 = report.get("n_plus_one")
    parts.append("N+1 unknown (no capacity declared)" if n1 is None else ("N+1 yes" if n1 else "N+1 NO"))
    if report.get("server_loss_verdict"):
        parts.append(f"if one server fails: {report['server_loss_verdict']}")
    return (f'<span class="resilience" data-resilience="{_e(status)}">{_badge(status)}</span> '
            f'<span class="muted">{_e("; ".join(parts))}</span>')


def _observations(be: dict[str, Any]) -> str:
    obs = be.get("observations") or {}
    if not obs:
        return '<span class="muted">none yet</span>'
    return " ".join(f'<span class="obs" title="{_e(node)}: {_e(state)}">{_e(node)} {_badge(state)}</span>'
                    for node, state in sorted(obs.items()))


def needs_attention(be: dict[str, Any]) -> bool:
    return be.get("verdict") != "up" or be.get("admin_state") != "active"


def rows_shown(backends: list[dict[str, Any]], limit: int = MAX_BACKEND_ROWS) -> list[dict[str, Any]]:
    """At most `limit` backends, those that need attention (not up, or not active) first
    picked, shown in their usual order: a page polled every second must stay cheap to render
    and to display at thousands of backends (`halb backend list` shows them all)."""
    if len(backends) <= limit:
        return backends
    picked = sorted(range(len(backends)), key=lambda i: (not needs_attention(backends[i]), i))[:limit]
    return [backends[i] for i in sorted(picked)]


def _service(svc: dict[str, Any], status_row: dict[str, Any], report: dict[str, Any] | None,
             backends: list[dict[str, Any]], node: str, limit: int = MAX_BACKEND_ROWS) -> tuple[str, int]:
    """The service's section, and how many backend rows it lists (at most `limit`)."""
    rows = []
    shown = rows_shown(backends, limit)
    for be in shown:
        local = (be.get("local") or {}).get("state")
        rows.append(
            f'<tr data-backend="{_e(svc["name"])}/{_e(be.get("name"))}" data-admin-state="{_e(be.get("admin_state"))}" '
            f'data-verdict="{_e(be.get("verdict"))}"><td><strong>{_e(be.get("name"))}</strong></td>'
            f"<td><code>{_e(be.get('address'))}</code></td><td>{_e(be.get('server') or '-')}</td>"
            f"<td>{_e(be.get('weight'))}</td><td class='admin-state'>{_badge(be.get('admin_state'))}</td>"
            f"<td class='verdict'>{_badge(be.get('verdict'))}</td><td>{_observations(be)}</td>"
            f"<td>{_badge(local or '-', 'info' if not local else None)}</td>"
            f"<td>{_e(be.get('in_flight', 0))}</td><td>{_e(be.get('requests', 0))}</td></tr>")
    table = _table(["Backend", "Address", "Server", "Weight", "Admin state", "Verdict", "Observed by",
                    f"Here ({node})", "In flight", "Requests"], rows, "backends",
                   "no backends" if not backends else f"not listed: the page lists at most {MAX_PAGE_ROWS:,} backends")
    if len(shown) < len(backends):
        listed = {id(b) for b in shown}
        hidden = [b for b in backends if id(b) not in listed]
        table += (f'<p class="muted more">{len(hidden)} more backends not shown '
                  f'({sum(needs_attention(b) for b in hidden)} of them not up or not active): '
                  f'<code>halb backend list -s {_e(svc["name"])}</code></p>')
    warnings = list(status_row.get("warnings") or [])
    warn_html = "".join(f'<li>{_e(w)}</li>' for w in warnings)
    listen = ", ".join(status_row.get("listen") or svc.get("listen_nodes") or []) or "-"
    routing = status_row.get("routing", "ok")
    return (f'<section class="service" data-service="{_e(svc["name"])}">'
            f'<h3>{_e(svc["name"])} <span class="muted">{_e(svc.get("mode"))}, {_e(svc.get("algorithm"))}, '
            f'listens on {_e(listen)}</span>'
            + ("" if routing == "ok" else f' {_badge("routing error", "bad")}') + "</h3>"
            f'<p>Resilience: {_resilience_line(report)}</p>'
            + (f'<ul class="warnings">{warn_html}</ul>' if warn_html else "")
            + f"{table}</section>"), len(shown)


def _services(snap: Snapshot) -> str:
    by_service: dict[str, list[dict[str, Any]]] = {}
    for be in snap.backends:
        by_service.setdefault(be["service"], []).append(be)
    status_rows = {s["name"]: s for s in snap.status.get("services", [])}
    views = {s["name"]: s for s in snap.services}
    # the status view's order: services at risk first
    order = [n for n in status_rows if n in views] + sorted(n for n in views if n not in status_rows)
    node = str(snap.status.get("node") or "")
    parts = []
    budget = MAX_PAGE_ROWS  # rows left for the services further down the page
    for n in order:
        html, listed = _service(views[n], status_rows.get(n, {}), snap.resilience.get(n), by_service.get(n, []),
                                node, min(MAX_BACKEND_ROWS, budget))
        parts.append(html)
        budget -= listed
    body = "".join(parts) or '<p class="empty">no services</p>'
    return f'<section id="services"><h2>Services <span class="muted">({len(parts)})</span></h2>{body}</section>'


def _events(snap: Snapshot) -> str:
    rows = [f'<tr data-seq="{_e(ev.get("seq"))}" data-kind="{_e(ev.get("kind"))}"><td>{_e(ev.get("seq"))}</td>'
            f"<td>{_e(_utc(ev.get('at')))}</td><td><code>{_e(ev.get('kind'))}</code></td>"
            f"<td class='message'>{_e(ev.get('message'))}</td><td>{_e(ev.get('by'))}</td><td>{_e(ev.get('node'))}</td></tr>"
            for ev in snap.events]
    table = _table(["#", "At (UTC)", "Kind", "What", "By", "Via"], rows, "events", "no events yet")
    return f'<section id="events"><h2>Latest events <span class="muted">(newest first)</span></h2>{table}</section>'


def render_live(snap: Snapshot) -> str:
    """The part of the page that refreshes: also the body of GET /ui/live."""
    return _summary(snap) + _members(snap) + _services(snap) + _events(snap)


def page(title: str, body: str) -> str:
    """A complete document; scripts and styles only from this node (the CSP forbids others)."""
    return ("<!doctype html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title>"
            '<link rel="stylesheet" href="/ui/static/style.css">'
            f"</head><body>{body}</body></html>\n")


def render_status_page(snap: Snapshot, who: str, role: str) -> str:
    node = snap.status.get("node")
    header = (f'<header><h1>halb <span class="muted">cluster status</span></h1>'
              f'<div class="session"><span id="refresh" class="ok" aria-live="polite">live</span> '
              f'<span class="muted">signed in as <strong>{_e(who)}</strong> ({_e(role)})</span>'
              '<form method="post" action="/ui/logout"><button type="submit">Sign out</button></form></div></header>')
    return page(f"halb · {node}",
                f'{header}<main id="live">{render_live(snap)}</main>'
                '<script src="/ui/static/app.js" defer></script>')


def render_login(message: str = "", node: str = "", plain_http: bool = False) -> str:
    note = f'<p class="error" role="alert">{_e(message)}</p>' if message else ""
    if plain_http:
        note += ('<p class="warning" id="plain-http">This node serves plain HTTP (<code>--insecure-dev</code>): '
                 "the token you enter crosses the network unencrypted, on every refresh.</p>")
    return page(f"halb · sign in{' · ' + node if node else ''}",
                '<main class="login"><h1>halb <span class="muted">cluster status</span></h1>'
                f"{note}"
                '<form method="post" action="/ui/login" id="login">'
                '<label for="token">API token</label>'
                '<input type="password" id="token" name="token" autocomplete="off" required autofocus>'
                '<button type="submit">Sign in</button></form>'
                '<p class="muted">Any token works: <code>halb token add NAME --role read</code> makes one that can '
                "only look. The token is kept in a cookie only this page's address receives.</p></main>")


__all__ = ["Snapshot", "take_snapshot", "render_live", "render_status_page", "render_login", "member_role"]
