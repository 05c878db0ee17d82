"""Drill reports: JSON for machines, one HTML page per drill with a timeline plot.

The plot is what a reviewer looks at first: request rate and errors, p50/p99 latency,
which node led and who held the VIP, each backend's verdict, with the injected faults
shaded across all panels, so cause and effect line up on one time axis. matplotlib runs
with the Agg backend (no display) and the PNG is embedded as base64, so the HTML file is
self-contained and can be attached to a ticket.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

VERDICT_COLORS = {"up": "#3a9d23", "down": "#d62728", "held": "#ff9f1c", "pending": "#9ecae1", None: "#cccccc"}
FAULT_COLORS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def write_report(data: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Write SLUG.json, SLUG.png and SLUG.html in directory; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    slug = data["drill"]["slug"]
    paths = {"json": directory / f"{slug}.json", "png": directory / f"{slug}.png", "html": directory / f"{slug}.html"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    png = render_timeline(data)
    paths["png"].write_bytes(png)
    paths["html"].write_text(render_html(data, png))
    return paths


def write_index(results: list[dict[str, Any]], directory: Path) -> Path:
    """summary.json and index.html linking every drill's page."""
    summary = [{"drill": r["drill"]["slug"], "title": r["drill"]["title"], "result": r["result"],
                "client_visible_errors": r["client_visible_errors"],
                "requests": r["load"]["total"]["requests"] if r.get("load") else 0,
                "client_retries": r["load"]["total"]["client_retries"] if r.get("load") else 0,
                "p99_ms": r["load"]["total"]["p99_ms"] if r.get("load") else None,
                "ledger": (r.get("ledger") or {}).get("intact"), "failures": r["failures"],
                "monitor_poll_failures": sum(f["count"] for f in (r.get("monitor") or {}).get("poll_failures", []))}
               for r in results]
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = "".join(
        f"<tr class='{s['result']}'><td><a href='{html.escape(s['drill'])}.html'>{html.escape(s['drill'])}</a></td>"
        f"<td>{html.escape(s['title'])}</td><td>{s['result'].upper()}</td><td>{s['requests']}</td>"
        f"<td>{s['client_visible_errors']}</td><td>{s['client_retries']}</td><td>{s['p99_ms']}</td>"
        f"<td>{'intact' if s['ledger'] else ('n/a' if s['ledger'] is None else 'BROKEN')}</td></tr>"
        for s in summary)
    page = (f"<!doctype html><meta charset=utf-8><title>halb chaos drills</title>{_STYLE}"
            f"<h1>halb chaos drills</h1><table><tr><th>drill</th><th>title</th><th>result</th><th>requests</th>"
            f"<th>client-visible errors</th><th>client retries</th><th>p99 ms</th><th>ledger</th></tr>{rows}</table>")
    path = directory / "index.html"
    path.write_text(page)
    return path


def _step_series(samples: list[dict[str, Any]], key: str) -> list[tuple[float, Any]]:
    out: list[tuple[float, Any]] = []
    for s in samples:
        v = s.get(key)
        if not out or out[-1][1] != v:
            out.append((s["t"], v))
    return out


def _coarsen(bks: list[dict[str, Any]], width: float) -> list[dict[str, Any]]:
    """Sum 100 ms buckets into `width`-second ones (counts only)."""
    out: dict[int, dict[str, Any]] = {}
    for b in bks:
        i = int(b["t"] / width + 1e-9)
        c = out.setdefault(i, {"t": round(i * width, 3), "ok": 0, "errors": 0, "retried": 0, "sent": 0})
        for k in ("ok", "errors", "retried", "sent"):
            c[k] += b[k]
    return [out[i] for i in sorted(out)]


def render_timeline(data: dict[str, Any], dpi: int = 80) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = data.get("timeline") or {}
    bks = tl.get("buckets") or []
    samples = tl.get("samples") or []
    end = max([data.get("duration_s") or 0.0] + [b["t"] for b in bks] + [0.1])
    fig, axes = plt.subplots(4, 1, figsize=(11, 8.2), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 2.2, 1.2, 1.6]})
    ax_rate, ax_lat, ax_lead, ax_verd = axes
    width = 0.5  # rates over 500 ms: 100 ms buckets at 50 req/s are too grainy to read
    coarse = _coarsen(bks, width)
    ts = [b["t"] for b in coarse]
    ax_rate.bar(ts, [b["ok"] / width for b in coarse], width=width, align="edge", color="#4c72b0", label="ok req/s")
    ax_rate.bar(ts, [b["errors"] / width for b in coarse], width=width, align="edge", color="#d62728",
                bottom=[b["ok"] / width for b in coarse], label="errors/s")
    retried = [(b["t"], b["retried"] / width) for b in coarse if b["retried"]]
    if retried:
        ax_rate.scatter([t + width / 2 for t, _ in retried], [v for _, v in retried], marker="v", color="#ff7f0e",
                        s=14, zorder=3, label="client retried/s")
    ax_rate.set_ylabel("requests/s\n(by send time)")
    ax_rate.legend(loc="upper right", fontsize=7, ncol=3)
    lat = [(b["t"] + 0.05, b["p50_ms"], b["p99_ms"]) for b in bks if b["p50_ms"] is not None]
    if lat:
        ax_lat.plot([x[0] for x in lat], [max(x[1], 0.1) for x in lat], color="#4c72b0", lw=1, label="p50")
        ax_lat.plot([x[0] for x in lat], [max(x[2], 0.1) for x in lat], color="#dd8452", lw=1, label="p99")
        ax_lat.set_yscale("log")
        ax_lat.legend(loc="upper right", fontsize=7)
    ax_lat.set_ylabel("latency ms\n(per 100 ms)")

    # leader and VIP holder as step lines over categorical node ids
    nodes = sorted({s["leader"] for s in samples if s.get("leader")} |
                   {v for s in samples for v in (s.get("vip") or "").split(",") if v and v != "-"} |
                   set((data.get("target") or {}).get("apis", {}).keys()))
    ypos = {n: i for i, n in enumerate(nodes)}
    ypos[None] = -1
    lead = _step_series(samples, "leader")
    for (t, v), nxt in zip(lead, lead[1:] + [(end, None)]):
        ax_lead.hlines(ypos.get(v, -1), t, nxt[0], colors="#2ca02c" if v else "#d62728", lw=5)
    vip = _step_series(samples, "vip")
    has_vip = any(v is not None for _, v in vip)
    if has_vip:
        for (t, v), nxt in zip(vip, vip[1:] + [(end, None)]):
            for h in (v or "").split(","):
                if h in ypos:
                    ax_lead.hlines(ypos[h] + 0.25, t, nxt[0], colors="#9467bd", lw=3)
    ax_lead.set_yticks(list(range(-1, len(nodes))))
    ax_lead.set_yticklabels(["none"] + nodes, fontsize=7)
    ax_lead.set_ylim(-1.5, len(nodes) - 0.3)
    ax_lead.set_ylabel("leader" + ("\n(+VIP, purple)" if has_vip else "\n(VIP: n/a)"))

    backends = sorted({b for s in samples for b in (s.get("verdicts") or {})})
    for i, name in enumerate(backends):
        series: list[tuple[float, Any]] = []
        for s in samples:
            v = (s.get("verdicts") or {}).get(name)
            if not series or series[-1][1] != v:
                series.append((s["t"], v))
        for (t, v), nxt in zip(series, series[1:] + [(end, None)]):
            ax_verd.barh(i, nxt[0] - t, left=t, height=0.6, color=VERDICT_COLORS.get(v, "#cccccc"))
    ax_verd.set_yticks(range(len(backends)))
    ax_verd.set_yticklabels(backends)
    ax_verd.set_ylabel("verdict\n(green up, red down,\nblue pending)")
    ax_verd.set_xlabel("seconds since the drill started")

    for j, f in enumerate(data.get("faults") or []):
        color = FAULT_COLORS[j % len(FAULT_COLORS)]
        f_end = f["end"] if f["end"] is not None else end
        if f_end - f["start"] < 0.15:
            f_end = f["start"] + 0.15
        for ax in axes:
            ax.axvspan(f["start"], f_end, color=color, alpha=0.15, lw=0)
        ax_rate.text(f["start"], 1.0, " " + f["label"], transform=ax_rate.get_xaxis_transform(), fontsize=7,
                     va="bottom", color=color, clip_on=False)
    for p in data.get("phases") or []:
        if p["phase"] in ("method", "steady-after"):
            for ax in axes:
                ax.axvline(p["t"], color="#555555", lw=0.6, ls="--")
    ax_verd.set_xlim(0, end)
    title = f"{data['drill']['title']} - {data['result'].upper()}"
    fig.suptitle(title, fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


_STYLE = """<style>
body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.passed td:nth-child(3),.ok{color:#2a7d14;font-weight:bold}.failed td:nth-child(3),.bad{color:#c00;font-weight:bold}
.na{color:#888}code,pre{font-size:12px}pre{background:#f6f6f6;padding:.5em;overflow:auto}
</style>"""


def _probe_rows(probes: list[dict[str, Any]]) -> str:
    rows = []
    for p in probes:
        cls, word = ("na", "n/a") if p["ok"] is None else (("ok", "held") if p["ok"] else ("bad", "FAILED"))
        rows.append(f"<tr><td>{html.escape(p['name'])}</td><td class={cls}>{word}</td>"
                    f"<td>{html.escape(str(p['tolerance']))}</td><td>{html.escape(p['detail'])}</td></tr>")
    return "".join(rows)


def render_html(data: dict[str, Any], png: bytes) -> str:
    d = data
    esc = html.escape
    hyp = "".join(f"<h3>steady state {k}</h3><table><tr><th>probe</th><th>result</th><th>tolerance</th><th>detail</th>"
                  f"</tr>{_probe_rows(v)}</table>" for k, v in d["hypothesis"].items())
    steps = "".join(f"<tr><td>{s['t_start']:.2f}</td><td>{esc(s['key'])}</td><td>{esc(s['description'])}</td>"
                    f"<td class={'ok' if s['status'] == 'ok' else ('na' if s['status'] == 'skipped' else 'bad')}>"
                    f"{s['status']}</td><td>{esc(s['detail'])}</td></tr>" for s in d["steps"])
    interesting = [e for e in d["events"] if not e["kind"].startswith("step.")]
    events = "".join(f"<tr><td>{e['t']:.2f}</td><td>{esc(e['kind'])}</td>"
                     f"<td>{esc(json.dumps({k: v for k, v in e.items() if k not in ('t', 'kind')}, default=str))}</td></tr>"
                     for e in interesting)
    total = d["load"]["total"]
    ledger = d.get("ledger")
    ledger_text = "not checked" if not ledger else (
        f"{'intact' if ledger['intact'] else 'BROKEN'}: {ledger['acknowledged']} acknowledged orders, "
        f"{ledger['lost_count']} lost, {ledger['duplicated_count']} duplicated, {ledger['mismatched_count']} mismatched; "
        f"{ledger['unacknowledged_stored_count']} stored without an acknowledgement (allowed)")
    failures = "".join(f"<li>{esc(f)}</li>" for f in d["failures"]) or "<li>none</li>"
    poll_failures = (d.get("monitor") or {}).get("poll_failures") or []
    polls = "".join(f"<tr><td>{esc(f['poll'])}</td><td>{esc(f['node'] or '-')}</td><td>{esc(f['error'])}</td>"
                    f"<td>{f['count']}</td><td>{f['first_t']:.2f} - {f['last_t']:.2f}</td></tr>" for f in poll_failures)
    polls_html = ("<h2>Monitor polling failures</h2><p>The monitor could not read the cluster's own view at these "
                  "times (a dead or partitioned node shows here too); the leader/VIP/verdict panels have gaps "
                  "there.</p><table><tr><th>poll</th><th>node</th><th>error</th><th>count</th><th>t (s)</th></tr>"
                  f"{polls}</table>") if poll_failures else "<p>Monitor: every poll answered.</p>"
    img = base64.b64encode(png).decode()
    return f"""<!doctype html><meta charset=utf-8><title>{esc(d['drill']['title'])}</title>{_STYLE}
<h1>{esc(d['drill']['title'])} <span class={'ok' if d['result'] == 'passed' else 'bad'}>{d['result'].upper()}</span></h1>
<p>{esc(d['drill']['description'])}</p>
<p><code>{esc(d['drill']['file'])}</code>, target {esc(d['target']['kind'])}, {d['duration_s']:.1f} s,
clients: {esc(d['load']['client_mode'])} {esc(', '.join(d['load']['client_addresses']))}</p>
<h2>Verdict</h2><ul>{failures}</ul>
<p><b>{total['requests']}</b> requests, <b>{total['errors']}</b> client-visible errors,
{total['client_retries']} needed a client retry (next balancer), p50 {total['p50_ms']:.1f} ms, p99 {total['p99_ms']:.1f} ms,
max {total['max_ms']:.0f} ms. Served by {esc(json.dumps(total['served_by']))}. Errors: {esc(json.dumps(total['error_kinds']))}.</p>
<p>Ledger: <b>{esc(ledger_text)}</b></p>
{polls_html}
<img alt="timeline" style="max-width:100%" src="data:image/png;base64,{img}">
{hyp}
<h2>Method and rollbacks</h2><table><tr><th>t (s)</th><th>step</th><th>action</th><th>status</th><th>detail</th></tr>{steps}</table>
<h2>Events</h2><table><tr><th>t (s)</th><th>kind</th><th>detail</th></tr>{events}</table>
"""
