"""The demo's HTTPS edge: a demo CA, a certificate for the shop's names, an HTTPS frontend
with Host and path routes to two services (checkout and catalog), seeded by `halb cluster up`.

Node configs seed services only (`[[services]]`, applied once to an empty cluster);
certificates, frontends and routes live in the replicated state and are made through the
admin API. So `cluster init` writes `demo-edge.json` (what to make) next to the node
configs, and `cluster up` applies it after a leader is elected, idempotently: what exists
is left as it is (an operator's change survives a restart), what is missing is made.

Why a demo CA of its own rather than the cluster CA (`ca.crt`): the cluster CA vouches for
node identities (node certificates are also TLS *client* certificates every peer and the CLI
accept), so it must never be something a browser or a colleague's curl is told to trust. The
demo CA is name-constrained to `localhost` (critical NameConstraints): trusting
`demo-ca.crt` trusts `*.localhost` and nothing else. It stands in for a public CA (or
`halb cert acme`) and can be thrown away without touching the cluster. Its key (mode 0600)
stays in the cluster directory, not in a node's data dir; the site key is generated in
memory and only ever stored sealed in the cluster state.
"""
from __future__ import annotations

import datetime as dt
import json
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

EDGE_FILE = "demo-edge.json"
DEMO_CA_CERT, DEMO_CA_KEY = "demo-ca.crt", "demo-ca.key"
SITE_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)  # a second `cluster up` re-issues a site certificate this close to expiry
HEALTH = {"kind": "http", "path": "/health", "interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 2}


@dataclass
class DemoEdge:
    """What `cluster up` seeds (the file demo-edge.json holds the same keys)."""

    frontend: str = "web"
    port: int = 8443
    http_port: int = 8000  # plain HTTP, answering 308 to https://
    cert: str = "shop-demo"
    shop_host: str = "shop.localhost"
    catalog_host: str = "catalog.shop.localhost"
    catalog_prefix: str = "/catalog/"
    shop_service: str = "checkout"
    catalog_service: str = "catalog"
    catalog_port: int = 8090  # catalog's own listener on every node (a routed service needs one)
    # the catalog app runs in the checkout backend processes of these names, on these addresses
    catalog_backends: list[tuple[str, str]] = field(default_factory=lambda: [
        ("A", "127.0.0.21:8090"), ("B", "127.0.0.22:8090"), ("C", "127.0.0.23:8090")])

    @property
    def hosts(self) -> list[str]:
        return [self.shop_host, self.catalog_host]

    def routes(self) -> list[dict[str, str]]:
        """Host shop -> checkout, Host catalog -> catalog, and shop + /catalog/ -> catalog
        (a path prefix beats the host's `/` route: longest match first)."""
        return [{"host": self.shop_host, "path_prefix": "/", "service": self.shop_service},
                {"host": self.shop_host, "path_prefix": self.catalog_prefix, "service": self.catalog_service},
                {"host": self.catalog_host, "path_prefix": "/", "service": self.catalog_service}]

    def catalog_service_body(self, host: str) -> dict[str, Any]:
        """`service.add` for catalog. Every node binds its own listen host with the port of
        `listen`; `host` only fills the field (the shop service's host)."""
        return {"name": self.catalog_service, "mode": "http", "listen": f"{host}:{self.catalog_port}",
                "algorithm": "round_robin",
                "options": {"health": dict(HEALTH)},
                "backends": {name: {"name": name, "address": addr, "weight": 100, "server": name}
                             for name, addr in self.catalog_backends}}


class EdgeError(ValueError):
    """demo-edge.json unreadable or malformed."""


def write_edge(directory: Path, edge: DemoEdge) -> None:
    (directory / EDGE_FILE).write_text(json.dumps(asdict(edge), indent=2) + "\n")


def read_edge(directory: Path) -> DemoEdge | None:
    """The directory's demo edge, or None when it has none (a layout from an older halb)."""
    path = directory / EDGE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        raw["catalog_backends"] = [tuple(x) for x in raw.get("catalog_backends", [])]
        edge = DemoEdge(**raw)
        if not all(isinstance(n, str) and isinstance(a, str) for n, a in edge.catalog_backends):
            raise TypeError("catalog_backends must be [[NAME, HOST:PORT], ...]")
    except (OSError, ValueError, TypeError) as exc:
        raise EdgeError(f"{path}: {exc}") from None
    return edge


def ensure_demo_ca(directory: Path) -> tuple[Any, bool]:
    """The demo CA (demo-ca.crt, demo-ca.key 0600) in directory: loaded, or made. Returns
    (CA, made now). A random tag in its name lets `cluster up` tell whether the site
    certificate in the cluster came from this CA."""
    from halb.demo.launcher import write_private
    from halb.pki import PkiError, load_issued, new_ca

    cert, key = directory / DEMO_CA_CERT, directory / DEMO_CA_KEY
    if cert.exists() and key.exists():
        return load_issued(cert.read_bytes(), key.read_bytes()), False
    if cert.exists():
        raise PkiError(f"{cert} exists but {key} does not: remove {cert} to make a new demo CA")
    ca = new_ca("", common_name=f"halb demo CA {secrets.token_hex(4)} (localhost only)", permitted_dns=["localhost"])
    write_private(key, ca.key_pem)
    cert.write_bytes(ca.cert_pem)
    return ca, True


def _needs_cert(row: dict[str, Any] | None, ca: Any, now: dt.datetime) -> bool:
    if row is None:
        return True
    if row.get("issuer") != ca.cert.subject.rfc4514_string()[:200]:
        return True  # from another (older) demo CA: the printed --cacert would not verify it
    return (row.get("not_after") or 0) < (now + RENEW_BEFORE).timestamp()


def seed_edge(client: Any, directory: Path, edge: DemoEdge, say: Callable[[str], None]) -> dict[str, Any]:
    """Make what is missing of the demo edge through the admin API; returns the frontend
    as `frontend list --json` shows it. Raises ApiError/Unreachable from the client."""
    from halb.pki import issue_server_cert

    services = {s["name"]: s for s in client.get("/v1/services")["services"]}
    made = []
    if edge.catalog_service not in services:
        shop_listen = (services.get(edge.shop_service) or {}).get("listen") or "0.0.0.0:0"
        client.post("/v1/services", edge.catalog_service_body(shop_listen.rsplit(":", 1)[0]))
        made.append(f"service {edge.catalog_service}")
    ca, _ = ensure_demo_ca(directory)
    now = dt.datetime.now(dt.timezone.utc)
    row = next((r for r in client.get("/v1/certs")["certs"] if r["name"] == edge.cert), None)
    if _needs_cert(row, ca, now):
        site = issue_server_cert(ca, edge.hosts, days=SITE_DAYS, now=now)
        client.post("/v1/certs", {"name": edge.cert, "cert": site.cert_pem.decode(), "key": site.key_pem.decode(),
                                  "replace": row is not None})
        made.append(f"certificate {edge.cert} ({', '.join(edge.hosts)})")
    frontends = {f["name"]: f for f in client.get("/v1/frontends")["frontends"]}
    fe = frontends.get(edge.frontend)
    if fe is None:
        client.post("/v1/frontends", {"name": edge.frontend, "port": edge.port, "tls": True,
                                      "http_port": edge.http_port, "redirect_https": True})
        made.append(f"frontend {edge.frontend} (HTTPS :{edge.port}, HTTP :{edge.http_port} redirects)")
    if fe is None or not fe.get("routes"):  # seed-only: routes an operator removed later stay removed
        for r in edge.routes():
            client.post(f"/v1/frontends/{edge.frontend}/routes", r)
        made.append(f"{len(edge.routes())} routes")
    if made:
        say(f"seeded the demo HTTPS edge: {', '.join(made)}")
    return next(f for f in client.get("/v1/frontends")["frontends"] if f["name"] == edge.frontend)


def halb_command() -> str:
    """How to run this halb from any shell: the venv's `halb` script when there is one."""
    script = Path(sys.executable).parent / "halb"
    return shlex.quote(str(script)) if script.exists() else f"{shlex.quote(sys.executable)} -m halb"


def edge_commands(directory: Path, edge: DemoEdge, fe: dict[str, Any]) -> list[tuple[str, str]]:
    """(what it shows, command) pairs that work as printed: --resolve names every node's
    address of the frontend (curl tries them in order, so a command survives a stopped
    balancer); --cacert the demo CA."""
    ca = shlex.quote(str((directory / DEMO_CA_CERT).resolve()))
    port, http_port = fe["port"], fe.get("http_port") or 0
    addrs = ",".join(a.rsplit(":", 1)[0] for a in fe["listen"])

    def resolve(host: str, p: int) -> str:
        return f"--resolve {host}:{p}:{addrs}"

    def curl(host: str, path: str) -> str:
        return f"curl -sS --cacert {ca} {resolve(host, port)} https://{host}:{port}{path}"

    out = [(f"Host {edge.shop_host} -> {edge.shop_service}", curl(edge.shop_host, "/products")),
           (f"Host {edge.catalog_host} -> {edge.catalog_service}", curl(edge.catalog_host, "/catalog/items")),
           (f"path {edge.shop_host}{edge.catalog_prefix} -> {edge.catalog_service}",
            curl(edge.shop_host, f"{edge.catalog_prefix}items"))]
    if http_port and fe.get("redirect_https"):
        out.append(("plain HTTP answers 308 to HTTPS",
                    f"curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' {resolve(edge.shop_host, http_port)} "
                    f"http://{edge.shop_host}:{http_port}/products"))
    out.append(("WebSocket echo (GET /ws; first message: the instance)",
                f"{halb_command()} demo ws wss://{edge.shop_host}:{port}/ws --cacert {ca} "
                f"{resolve(edge.shop_host, port)} --send hello"))
    return out
