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

import re
from typing import Any

from halb.certs.pem import MAX_CHAIN_BYTES, MAX_SANS
from halb.certs.sealing import is_sealed
from halb.model import (
    ADMIN_STATES, ModelError, backend_from, check_json_value, check_name, parse_hostport, service_from,
    to_primitive,
)
from halb.service_options import HealthCheck, finite_number
from halb.tokens import BOOTSTRAP_NAME, ROLES, is_token_hash
from halb.frontend_rules import check_path_prefix, check_route_host

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
    if op in ("cert.add", "cert.remove"):
        return _cert_args(op, a)
    if op.startswith("acme."):
        return _acme_args(op, a)
    if op in FRONTEND_OPS:
        return frontend_args(op, a)
    raise invalid(f"unknown operation {op!r}"[:200])


CERT_SOURCES = ("file", "acme")
CERT_KEYS = frozenset({"name", "chain", "key_sealed", "sans", "not_after", "not_before", "fingerprint", "issuer",
                       "key_type", "source", "replace"})


def _cert_args(op: str, a: Any) -> dict[str, Any]:
    """Shape of a certificate as the API node checked it (halb/certs/pem.py did the real
    checks with the plaintext key, which never gets here). The key must be sealed
    (halb/certs/sealing.py): a PEM private key is refused, so none can reach the journal."""
    if op == "cert.remove":
        a = _obj(a, op, frozenset({"name"}), ("name",))
        return {"name": _name(a["name"], "certificate name")}
    a = _obj(a, op, CERT_KEYS, ("name", "chain", "key_sealed", "sans", "not_after"))
    chain = a["chain"]
    if not isinstance(chain, str) or not chain.startswith("-----BEGIN CERTIFICATE-----") \
            or len(chain) > MAX_CHAIN_BYTES or "PRIVATE KEY" in chain:
        raise invalid("chain must be PEM certificates (no private key), at most "
                      f"{MAX_CHAIN_BYTES // 1024} KiB")
    if not is_sealed(a["key_sealed"]):
        raise invalid("key_sealed must be a key sealed with the cluster secret (v1.BASE64); "
                      "plaintext keys are never stored")
    sans = a["sans"]
    if not isinstance(sans, list) or not sans or len(sans) > MAX_SANS:
        raise invalid(f"sans must be a list of 1 to {MAX_SANS} names")
    out: dict[str, Any] = {
        "name": _name(a["name"], "certificate name"), "chain": chain, "key_sealed": a["key_sealed"],
        "sans": [_text(n, "san", 253) for n in sans],
        "source": a.get("source", "file"), "replace": _bool(a.get("replace", False), "replace"),
        "fingerprint": _text(a.get("fingerprint", ""), "fingerprint", 64),
        "issuer": _text(a.get("issuer", ""), "issuer", 200), "key_type": _text(a.get("key_type", ""), "key_type", 40),
    }
    if out["source"] not in CERT_SOURCES:
        raise invalid(f"source {out['source']!r} must be one of {', '.join(CERT_SOURCES)}"[:200])
    for k in ("not_after", "not_before"):
        v = a.get(k, 0.0)
        if isinstance(v, bool) or not finite_number(v):
            raise invalid(f"{k} {v!r} must be a finite number (unix seconds)"[:200])
        out[k] = float(v)
    return out


MAX_ACME_DOMAINS = 20
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def acme_domain(value: Any) -> str:
    """A name HTTP-01 can validate: a DNS name, not a wildcard, not an address."""
    if not isinstance(value, str) or not value or len(value) > 253:
        raise invalid(f"domain {value!r} must be a DNS name of at most 253 characters"[:200])
    name = value.lower().rstrip(".")
    if name.startswith("*."):
        raise invalid(f"domain {value!r}: HTTP-01 cannot validate wildcard names (add the certificate from a file)"
                      [:200])
    labels = name.split(".")
    if len(labels) < 2 or not all(_DNS_LABEL.match(lb) for lb in labels) or labels[-1].isdigit():
        raise invalid(f"domain {value!r} is not a DNS name (IP addresses cannot be validated over HTTP-01)"[:200])
    return name


def _pem_bundle(value: Any, what: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not value.startswith("-----BEGIN CERTIFICATE-----") \
            or len(value) > 2 * MAX_CHAIN_BYTES or "PRIVATE KEY" in value:
        raise invalid(f"{what} must be PEM certificates, at most {2 * MAX_CHAIN_BYTES // 1024} KiB")
    return value


def _acme_args(op: str, a: Any) -> dict[str, Any]:
    """ACME orders, their account and the HTTP-01 answers every node serves (halb/certs/)."""
    if op == "acme.request":
        a = _obj(a, op, frozenset({"name", "domains", "directory", "ca_bundle", "email"}),
                 ("name", "domains", "directory"))
        domains = a["domains"]
        if not isinstance(domains, list) or not 1 <= len(domains) <= MAX_ACME_DOMAINS:
            raise invalid(f"domains must be a list of 1 to {MAX_ACME_DOMAINS} names")
        names = [acme_domain(d) for d in domains]
        if len(set(names)) != len(names):
            raise invalid("domains lists a name twice")
        directory = _text(a["directory"], "directory", 500)
        if not directory.startswith("https://") or len(a["directory"]) > 500:
            raise invalid("directory must be the https:// URL of the ACME directory (at most 500 characters)")
        email = _text(a.get("email", ""), "email", 254)
        if email and ("@" not in email or any(c.isspace() for c in email)):
            raise invalid(f"email {email!r} is not an address"[:200])
        return {"name": _name(a["name"], "certificate name"), "domains": names, "directory": directory,
                "ca_bundle": _pem_bundle(a.get("ca_bundle"), "ca_bundle"), "email": email}
    if op == "acme.renew":
        a = _obj(a, op, frozenset({"name"}), ("name",))
        return {"name": _name(a["name"], "certificate name")}
    if op == "acme.failed":
        a = _obj(a, op, frozenset({"name", "reason"}), ("name", "reason"))
        return {"name": _name(a["name"], "certificate name"), "reason": _text(a["reason"], "reason", 500)}
    if op == "acme.account":
        a = _obj(a, op, frozenset({"directory", "key_sealed", "uri"}), ("directory", "key_sealed"))
        if not is_sealed(a["key_sealed"]):
            raise invalid("key_sealed must be a key sealed with the cluster secret")
        return {"directory": _text(a["directory"], "directory", 500), "key_sealed": a["key_sealed"],
                "uri": _text(a.get("uri", ""), "uri", 500)}
    if op == "acme.challenge":
        a = _obj(a, op, frozenset({"token", "key_authorization", "expires"}),
                 ("token", "key_authorization", "expires"))
        token, keyauth = a["token"], a["key_authorization"]
        if not isinstance(token, str) or not _B64URL.match(token):
            raise invalid("token must be 1 to 128 base64url characters")
        if not isinstance(keyauth, str) or not keyauth.startswith(token + ".") \
                or not _B64URL.match(keyauth[len(token) + 1:]):
            raise invalid("key_authorization must be TOKEN.THUMBPRINT (base64url)")
        if isinstance(a["expires"], bool) or not finite_number(a["expires"]):
            raise invalid("expires must be a finite number (unix seconds)")
        return {"token": token, "key_authorization": keyauth, "expires": float(a["expires"])}
    if op == "acme.challenge_clear":
        a = _obj(a, op, frozenset({"tokens"}), ("tokens",))
        tokens = a["tokens"]
        if not isinstance(tokens, list) or len(tokens) > MAX_ACME_DOMAINS * 4 \
                or not all(isinstance(t, str) and _B64URL.match(t) for t in tokens):
            raise invalid("tokens must be a list of challenge tokens")
        return {"tokens": list(tokens)}
    raise invalid(f"unknown operation {op!r}"[:200])


FRONTEND_OPS = ("frontend.add", "frontend.remove", "route.add", "route.remove")
FRONTEND_KEYS = frozenset({"name", "port", "tls", "http_port", "redirect_https", "default_service", "default_cert",
                           "accept_proxy"})


def _port(value: Any, what: str, *, optional: bool = False) -> int:
    if optional and value in (None, 0):
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise invalid(f"{what} {value!r} must be an integer 1-65535")
    return value


def _optional_name(value: Any, what: str) -> str:
    return "" if value in (None, "") else _name(value, what)


def frontend_args(op: str, a: Any) -> dict[str, Any]:
    """frontend.add/remove, route.add/remove (docs/dataplane.md "Frontends and routes").
    Hosts are canonical (lowercase, no port, no trailing dot) so that two spellings of one
    host cannot become two routes; what needs the state (services exist, ports free) is
    checked in apply."""
    if op == "frontend.remove":
        a = _obj(a, op, frozenset({"name"}), ("name",))
        return {"name": _name(a["name"], "frontend name")}
    if op == "frontend.add":
        a = _obj(a, op, FRONTEND_KEYS, ("name", "port"))
        out = {"name": _name(a["name"], "frontend name"), "port": _port(a["port"], "port"),
               "tls": _bool(a.get("tls", False), "tls"),
               "http_port": _port(a.get("http_port"), "http_port", optional=True),
               "redirect_https": _bool(a.get("redirect_https", False), "redirect_https"),
               "default_service": _optional_name(a.get("default_service"), "default service"),
               "default_cert": _optional_name(a.get("default_cert"), "default certificate"),
               "accept_proxy": _bool(a.get("accept_proxy", False), "accept_proxy")}
        if out["http_port"] and not out["tls"]:
            raise invalid("http_port is the plain-HTTP port of a TLS frontend: give tls, or use port alone "
                          "for a plain frontend")
        if out["http_port"] == out["port"]:
            raise invalid(f"http_port {out['port']} must differ from port")
        if out["redirect_https"] and not out["http_port"]:
            raise invalid("redirect_https needs http_port (the plain port that redirects to the TLS one)")
        if out["default_cert"] and not out["tls"]:
            raise invalid("default_cert is only for a TLS frontend")
        return out
    keys = frozenset({"frontend", "host", "path_prefix", "service"})
    a = _obj(a, op, keys if op == "route.add" else keys - {"service"},
             ("frontend", "host", "service") if op == "route.add" else ("frontend", "host"))
    try:
        out = {"frontend": _name(a["frontend"], "frontend name"), "host": check_route_host(a["host"]),
               "path_prefix": check_path_prefix(a.get("path_prefix", "/"))}
    except ModelError as exc:
        raise invalid(str(exc)) from None
    if op == "route.add":
        out["service"] = _name(a["service"], "service name")
    return out


OPS = ("seed", "service.add", "service.remove", "service.update", "backend.add", "backend.remove", "backend.state",
       "backend.weight", "backend.limits", "member.register", "member.remove", "event.record", "health.observe",
       "health.observe_many", "health.liveness", "health.release", "lease.renew", "lease.release", "lease.contact",
       "token.add",
       "token.revoke", "cert.add", "cert.remove",
       "acme.request", "acme.renew", "acme.failed", "acme.account", "acme.challenge", "acme.challenge_clear",
       "frontend.add", "frontend.remove", "route.add", "route.remove")


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
