"""One schema per state-machine command: strict validation before anything is proposed or applied.

`validate_command(op, args)` checks every field of a command's args (types, ranges, finite
numbers, unknown keys) and returns a canonical copy (e.g. algorithm alias `ewma` ->
`peak_ewma`, ints where floats are wanted become floats). It raises CommandError("invalid").

Who calls it (docs/api.md "Validation"):
- the admin API, before proposing, with the full nested health-check validator plugged in
  (halb/api/validation.py; the health layer sits above control, so it is injected);
- CommandWriter.write, for every internal write (seed, health observations, membership);
- ClusterState.apply, first thing: apply is the authority (a command in the log may come
  from an older or buggy writer), so it never raises and never half-applies.

Only the *shape* of a command is checked here; checks that need the current state
(does the service exist, is the listen port taken) live in the apply handlers.
"""
from __future__ import annotations

from typing import Any

from halb.model import (
    ADMIN_STATES, ModelError, backend_from, check_json_value, check_name, parse_hostport, service_from,
    to_primitive,
)
from halb.service_options import HealthCheck, finite_number
from halb.tokens import BOOTSTRAP_NAME, ROLES, is_token_hash

SERVICE_KEYS = frozenset({"name", "mode", "listen", "algorithm", "hash_key", "options", "backends"})
BACKEND_KEYS = frozenset({"name", "address", "weight", "admin_state", "server", "zone", "max_rps", "max_conns"})
UPDATE_KEYS = frozenset({"name", "algorithm", "hash_key", "listen", "options"})
MAX_SERVICES = 1000
MAX_BACKENDS = 10000
MAX_OBSERVATIONS = 1000
MAX_TEXT = 1000


class CommandError(Exception):
    """A command the state machine refuses; `code` maps to an HTTP status in the API."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> CommandError:
    return CommandError("invalid", message[:MAX_TEXT])


def _obj(value: Any, what: str, allowed: frozenset[str] | None = None,
         required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be an object, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise invalid(f"{what} has a key that is not a string: {k!r}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise invalid(f"{what}: unknown field(s): {', '.join(unknown)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise invalid(f"{what}: missing field(s): {', '.join(missing)}")
    return value


def _name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except ModelError as exc:
        raise invalid(str(exc)) from None


def _text(value: Any, what: str, limit: int = MAX_TEXT, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {type(value).__name__}")
    return value[:limit]


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{what} must be true or false, got {value!r}")
    return value


def backend_args(value: Any, what: str = "backend") -> dict[str, Any]:
    d = _obj(value, what, BACKEND_KEYS, ("name", "address"))
    try:
        return to_primitive(backend_from(d))
    except ModelError as exc:
        raise invalid(str(exc)) from None


def service_args(value: Any, what: str = "service", *, health: HealthCheck | None = None) -> dict[str, Any]:
    """A full service (service.add, seed entries): every field, every backend, every option."""
    d = _obj(value, what, SERVICE_KEYS, ("name",))
    raw_backends = d.get("backends", {})
    if isinstance(raw_backends, dict):
        items = list(raw_backends.items())
    elif isinstance(raw_backends, list):
        items = [(None, b) for b in raw_backends]
    else:
        raise invalid(f"{what}.backends must be a list or an object keyed by name")
    if len(items) > MAX_BACKENDS:
        raise invalid(f"{what}.backends lists more than {MAX_BACKENDS} backends")
    backends: dict[str, dict[str, Any]] = {}
    for key, b in items:
        be = backend_args(b, f"{what} backend {key!r}" if key is not None else f"{what} backend")
        if key is not None and key != be["name"]:
            raise invalid(f"{what}.backends key {key!r} differs from the backend's name {be['name']!r}")
        if be["name"] in backends:
            raise invalid(f"backend {be['name']!r} is listed twice")
        backends[be["name"]] = be
    try:
        svc = service_from({k: v for k, v in d.items() if k != "backends"})
        svc.backends = {n: backend_from(b) for n, b in backends.items()}
        svc.validate(health=health)
    except ModelError as exc:
        raise invalid(str(exc)) from None
    return to_primitive(svc)


def _service_update(a: dict[str, Any], health: HealthCheck | None) -> dict[str, Any]:
    a = _obj(a, "service.update", UPDATE_KEYS, ("name",))
    out: dict[str, Any] = {"name": _name(a["name"], "service name")}
    if len(a) == 1:
        raise invalid("service.update changes nothing (give algorithm, hash_key, listen or options)")
    # check each given field the same way service.add would, on a throw-away service
    probe = {k: a[k] for k in ("algorithm", "hash_key", "listen", "options") if k in a}
    checked = service_args(dict(probe, name=out["name"]), "service.update", health=health)
    out.update({k: checked[k] for k in probe})
    return out


def _observation(a: Any, what: str) -> dict[str, Any]:
    a = _obj(a, what, frozenset({"service", "backend", "up", "detail"}), ("service", "backend", "up"))
    return {"service": _name(a["service"], "service name"), "backend": _name(a["backend"], "backend name"),
            "up": _bool(a["up"], "up"), "detail": _text(a.get("detail"), "detail", 300, optional=True)}


def _ref(a: Any, op: str, service_key: str = "service", name_key: str = "name",
         extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    a = _obj(a, op, frozenset({service_key, name_key}) | extra, (service_key, name_key))
    return {service_key: _name(a[service_key], "service name"), name_key: _name(a[name_key], "backend name")}


def _validate(op: str, a: Any, health: HealthCheck | None) -> dict[str, Any]:
    if op == "seed":
        a = _obj(a, op, frozenset({"services"}), ("services",))
        if not isinstance(a["services"], list) or len(a["services"]) > MAX_SERVICES:
            raise invalid(f"seed.services must be a list of at most {MAX_SERVICES} services")
        return {"services": [service_args(s, f"seed service [{i}]", health=health)
                             for i, s in enumerate(a["services"])]}
    if op == "service.add":
        return service_args(a, health=health)
    if op == "service.remove":
        a = _obj(a, op, frozenset({"name"}), ("name",))
        return {"name": _name(a["name"], "service name")}
    if op == "service.update":
        return _service_update(a, health)
    if op == "backend.add":
        a = _obj(a, op, frozenset({"service", "backend"}), ("service", "backend"))
        return {"service": _name(a["service"], "service name"), "backend": backend_args(a["backend"])}
    if op == "backend.remove":
        return _ref(a, op)
    if op == "backend.state":
        out = _ref(a, op, extra=frozenset({"state"}))
        state = a.get("state")
        if not isinstance(state, str) or state not in ADMIN_STATES:
            raise invalid(f"admin state {state!r} must be one of {', '.join(ADMIN_STATES)}")
        return dict(out, state=state)
    if op == "backend.weight":
        out = _ref(a, op, extra=frozenset({"weight"}))
        w = a.get("weight")
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 10000:
            raise invalid(f"weight {w!r} must be an integer 0-10000")
        return dict(out, weight=w)
    if op == "backend.limits":
        out = _ref(a, op, extra=frozenset({"max_conns", "max_rps"}))
        if "max_conns" not in a and "max_rps" not in a:
            raise invalid("backend.limits changes nothing (give max_conns, max_rps or both)")
        if "max_conns" in a:
            mc = a["max_conns"]
            if isinstance(mc, bool) or not isinstance(mc, int) or not 0 <= mc <= 1 << 40:
                raise invalid(f"max_conns {mc!r} must be an integer >= 0 (0: no limit)")
            out["max_conns"] = mc
        if "max_rps" in a:
            mr = a["max_rps"]
            if not finite_number(mr) or not 0 <= mr <= 1e12:
                raise invalid(f"max_rps {mr!r} must be a finite number 0-1e12 (0: no limit)")
            out["max_rps"] = float(mr)
        return out
    if op == "member.register":
        a = _obj(a, op, frozenset({"id", "raft", "api", "listen_host"}), ("id", "raft", "api"))
        try:
            parse_hostport(a["raft"], "raft address")
            parse_hostport(a["api"], "api address")
        except ModelError as exc:
            raise invalid(str(exc)) from None
        lh = _text(a.get("listen_host"), "listen_host", 255, optional=True)
        if lh and (not lh.isascii() or any(c.isspace() for c in lh)):
            raise invalid(f"listen_host {lh!r} must be a host name or address")
        return {"id": _name(a["id"], "member id"), "raft": a["raft"], "api": a["api"], "listen_host": lh}
    if op == "member.remove":
        a = _obj(a, op, frozenset({"id"}), ("id",))
        return {"id": _name(a["id"], "member id")}
    if op == "event.record":
        a = _obj(a, op, frozenset({"kind", "message", "data"}), ("kind", "message"))
        data = a.get("data") or {}
        _obj(data, "event data")
        if len(data) > 64 or {"cmd", "kind", "message"} & set(data):
            raise invalid("event data must have at most 64 keys, none of them cmd, kind or message")
        try:
            check_json_value(data, "event data")
        except ModelError as exc:
            raise invalid(str(exc)) from None
        return {"kind": _name(a["kind"], "event kind"), "message": _text(a["message"], "event message", 500),
                "data": data}
    if op == "health.observe":
        return _observation(a, op)
    if op == "health.observe_many":
        a = _obj(a, op, frozenset({"observations"}), ("observations",))
        items = a["observations"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_OBSERVATIONS:
            raise invalid(f"observations must be a list of 1-{MAX_OBSERVATIONS} items")
        return {"observations": [_observation(i, "observation") for i in items]}
    if op == "health.liveness":
        a = _obj(a, op, frozenset({"live"}), ("live",))
        live = a["live"]
        if not isinstance(live, list) or len(live) > MAX_OBSERVATIONS:
            raise invalid("live must be a list of member ids")
        return {"live": sorted({_name(m, "member id") for m in live})}
    if op == "health.release":
        return _ref(a, op, name_key="backend")
    if op == "lease.renew":
        # "address": the DNS-mode announcer names the address it publishes (informational)
        a = _obj(a, op, frozenset({"holder", "term", "address"}), ("holder",))
        term = a.get("term", 0)
        if isinstance(term, bool) or not isinstance(term, int) or not 0 <= term < 1 << 63:
            raise invalid(f"term {term!r} must be a non-negative integer")
        out = {"holder": _name(a["holder"], "lease holder"), "term": term}
        if "address" in a:
            out["address"] = _text(a["address"], "lease address", 255)
        return out
    if op == "lease.contact":
        a = _obj(a, op, frozenset({"node"}), ("node",))
        return {"node": _name(a["node"], "node id")}
    if op == "lease.release":
        a = _obj(a, op, frozenset({"holder", "held"}), ("holder",))
        return {"holder": _name(a["holder"], "lease holder"), "held": _bool(a.get("held", False), "held")}
    if op == "token.add":
        # the hash only: the token itself never reaches the log, a snapshot or another node
        a = _obj(a, op, frozenset({"name", "role", "hash"}), ("name", "role", "hash"))
        name = _name(a["name"], "token name")
        if name == BOOTSTRAP_NAME:
            raise invalid(f"token name {BOOTSTRAP_NAME!r} is reserved for the nodes' own token (token_file)")
        if a["role"] not in ROLES:
            raise invalid(f"role {a['role']!r} must be one of {', '.join(ROLES)}"[:200])
        if not is_token_hash(a["hash"]):
            raise invalid("token hash must be 64 lowercase hex characters (SHA-256)")
        return {"name": name, "role": a["role"], "hash": a["hash"]}
    if op == "token.revoke":
        a = _obj(a, op, frozenset({"name"}), ("name",))
        name = _name(a["name"], "token name")
        if name == BOOTSTRAP_NAME:
            raise invalid(f"the {BOOTSTRAP_NAME!r} token is each node's token_file: replace that file to change it")
        return {"name": name}
    raise invalid(f"unknown operation {op!r}"[:200])


OPS = ("seed", "service.add", "service.remove", "service.update", "backend.add", "backend.remove", "backend.state",
       "backend.weight", "backend.limits", "member.register", "member.remove", "event.record", "health.observe",
       "health.observe_many", "health.liveness", "health.release", "lease.renew", "lease.release", "lease.contact",
       "token.add",
       "token.revoke")


def validate_command(op: Any, args: Any, *, health: HealthCheck | None = None) -> dict[str, Any]:
    """Canonical args of a valid command, or CommandError("invalid", why)."""
    if not isinstance(op, str):
        raise invalid(f"operation {op!r} must be a string"[:200])
    try:
        return _validate(op, {} if args is None else args, health)
    except CommandError:
        raise
    except (ModelError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        # a shape this schema missed: still a refusal with a reason, never a crash
        raise invalid(f"{op}: {type(exc).__name__}: {exc}") from None


def check_envelope(cmd: Any) -> tuple[str, Any, str | None]:
    """The fields around args that apply reads: op, id (hashable!), at, by, node."""
    if not isinstance(cmd, dict):
        raise invalid(f"command must be an object, got {type(cmd).__name__}")
    op, cid = cmd.get("op"), cmd.get("id")
    if not isinstance(op, str):
        raise invalid("command op must be a string")
    if cid is not None and (not isinstance(cid, str) or len(cid) > 200):
        raise invalid("command id must be a string of at most 200 characters")
    at = cmd.get("at")
    if at is not None and not finite_number(at):
        raise invalid(f"command time {at!r} must be a finite number"[:200])
    for key in ("by", "node"):
        if cmd.get(key) is not None and not isinstance(cmd.get(key), str):
            raise invalid(f"command {key} must be a string")
    return op, cmd.get("args"), cid or None


__all__ = ["CommandError", "OPS", "check_envelope", "validate_command", "service_args", "backend_args"]
