"""Apply handlers for frontends and their routes (ClusterState.frontends).

Kept out of state.py so that file stays about the core model; these are ordinary handlers:
args already validated in full (commands.frontend_args), every check that needs the state
done before anything changes, and nothing here reads a clock.

Decisions (docs/dataplane.md "Frontends and routes"):
- a frontend's port and http_port clash with a service listener's port and with other
  frontends' ports exactly like two services clash (model.listen_conflict: every node
  binds its own listen host with that port);
- a route or default service must name an existing HTTP service that has a listen address
  (a service's runtime on each node exists only for services that listen);
- removing a service that a route or default uses is refused with the users named,
  instead of dropping the routes: a dropped route would silently send that host's
  requests to the default service, which may be another application.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from halb.model import listen_conflict, parse_hostport

if TYPE_CHECKING:  # pragma: no cover
    from halb.control.state import ClusterState

MAX_FRONTENDS = 100
MAX_ROUTES = 1000  # per frontend


def _err(code: str, message: str) -> Exception:
    from halb.control.commands import CommandError

    return CommandError(code, message)


def _ok(**data: Any) -> dict[str, Any]:
    return {"ok": True, **data}


def frontend_ports(fe: dict[str, Any]) -> list[int]:
    return [p for p in (fe.get("port"), fe.get("http_port")) if isinstance(p, int) and p]


def frontend_port_clash(st: "ClusterState", listen: str, mode: str, *, exclude: str | None = None) -> str | None:
    """Why a service listening on `listen` would clash with a frontend's port, or None."""
    if not listen or mode not in ("http", "tcp"):
        return None
    _, port = parse_hostport(listen, "service listen address")
    for fe in st.frontends.values():
        if fe.get("name") != exclude and port in frontend_ports(fe):
            return (f"listen {listen} clashes with frontend {fe.get('name')!r} on port {port}: every node binds "
                    "its own listen host with that port")
    return None


def _port_clash(st: "ClusterState", name: str, port: int) -> str | None:
    for svc in st.services.values():  # the per-service rule (model.listen_conflict), one service at a time
        if listen_conflict([svc], f"0.0.0.0:{port}", "http") is not None:
            return (f"frontend {name!r}: port {port} is the listen port of service {svc.name!r} (every node binds "
                    "its own listen host with both)")
    for fe in st.frontends.values():
        if fe.get("name") != name and port in frontend_ports(fe):
            return f"frontend {name!r}: port {port} is already used by frontend {fe.get('name')!r}"
    return None


def _routable(st: "ClusterState", service: str, what: str) -> None:
    svc = st.services.get(service)
    if svc is None:
        raise _err("not_found", f"{what}: service {service!r} does not exist")
    if svc.mode != "http":
        raise _err("invalid", f"{what}: service {service!r} is a {svc.mode} service; frontends route HTTP requests "
                              "to HTTP services only")
    if not svc.listen:
        raise _err("invalid", f"{what}: service {service!r} has no listen address; a routed service needs one "
                              "(its runtime on every node)")


def service_users(st: "ClusterState", service: str) -> list[str]:
    """Frontends and routes that send requests to `service` (for refusing its removal)."""
    out = []
    for fe in sorted(st.frontends.values(), key=lambda f: str(f.get("name"))):
        if fe.get("default_service") == service:
            out.append(f"frontend {fe.get('name')} (default service)")
        for r in fe.get("routes") or []:
            if isinstance(r, dict) and r.get("service") == service:
                out.append(f"route {fe.get('name')} {r.get('host')}{r.get('path_prefix')}")
    return out


def frontend_add(st: "ClusterState", args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    name = args["name"]
    if name in st.frontends:
        raise _err("conflict", f"frontend {name!r} already exists")
    if len(st.frontends) >= MAX_FRONTENDS:
        raise _err("conflict", f"the cluster already has {MAX_FRONTENDS} frontends")
    for port in frontend_ports(args):
        clash = _port_clash(st, name, port)
        if clash:
            raise _err("conflict", clash)
    if args["default_service"]:
        _routable(st, args["default_service"], f"frontend {name!r} default service")
    record = dict(args, routes=[])
    st.frontends[name] = record
    kind = "TLS" if args["tls"] else "HTTP"
    extra = f", HTTP on {args['http_port']}" + (" redirecting to HTTPS" if args["redirect_https"] else "") \
        if args["http_port"] else ""
    if args.get("accept_proxy"):
        extra += ", PROXY header required"
    st.record(cmd, "frontend.added", f"frontend {name} added ({kind} on port {args['port']}{extra})", frontend=name)
    return _ok(frontend=record)


def frontend_remove(st: "ClusterState", args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    record = st.frontends.pop(args["name"], None)
    if record is None:
        raise _err("not_found", f"frontend {args['name']!r} does not exist")
    st.record(cmd, "frontend.removed", f"frontend {args['name']} removed ({len(record.get('routes') or [])} "
              "route(s) with it)", frontend=args["name"])
    return _ok(frontend=record)


def _frontend(st: "ClusterState", name: str) -> dict[str, Any]:
    fe = st.frontends.get(name)
    if fe is None:
        raise _err("not_found", f"frontend {name!r} does not exist")
    return fe


def route_add(st: "ClusterState", args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    fe = _frontend(st, args["frontend"])
    where = f"{args['host']}{args['path_prefix']}"
    _routable(st, args["service"], f"route {args['frontend']} {where}")
    routes = fe.setdefault("routes", [])
    for r in routes:
        if r.get("host") == args["host"] and r.get("path_prefix") == args["path_prefix"]:
            raise _err("conflict", f"frontend {args['frontend']!r} already routes {where} (to service "
                                   f"{r.get('service')!r}); remove that route first")
    if len(routes) >= MAX_ROUTES:
        raise _err("conflict", f"frontend {args['frontend']!r} already has {MAX_ROUTES} routes")
    route = {"host": args["host"], "path_prefix": args["path_prefix"], "service": args["service"]}
    routes.append(route)
    routes.sort(key=lambda r: (str(r.get("host")), str(r.get("path_prefix"))))
    st.record(cmd, "route.added", f"frontend {args['frontend']}: {where} -> service {args['service']}",
              frontend=args["frontend"], service=args["service"], host=args["host"], path_prefix=args["path_prefix"])
    return _ok(route=route)


def route_remove(st: "ClusterState", args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    fe = _frontend(st, args["frontend"])
    routes = fe.get("routes") or []
    for i, r in enumerate(routes):
        if r.get("host") == args["host"] and r.get("path_prefix") == args["path_prefix"]:
            del routes[i]
            st.record(cmd, "route.removed", f"frontend {args['frontend']}: route {args['host']}{args['path_prefix']} "
                      f"(to {r.get('service')}) removed", frontend=args["frontend"], host=args["host"],
                      path_prefix=args["path_prefix"], service=r.get("service"))
            return _ok(route=r)
    raise _err("not_found", f"frontend {args['frontend']!r} has no route {args['host']}{args['path_prefix']}")


__all__ = ["frontend_add", "frontend_remove", "frontend_port_clash", "route_add", "route_remove", "service_users"]
