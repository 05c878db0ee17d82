"""The cluster state machine: pure, deterministic, transport-free.

Every change arrives as one command `{op, args, id, by, node, at}`. `apply` validates the
whole command before touching anything (so a rejected command changes nothing), never
reads a clock or a random source (every replica must compute the same result), and
remembers recent command ids so a retried command is applied once and answers with the
first result.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from halb.control import frontend_state
from halb.control.commands import CommandError, check_envelope, validate_command
from halb.certs.records import acme_order_summary, cert_summary
from halb.tokens import MAX_TOKENS
from halb.service_options import CONTROL_OPTIONS, OptionError, check_option
from halb.model import (
    Backend, Event, Member, ModelError, Service, backend_from, listen_conflict, service_from, to_primitive,
)

MAX_EVENTS = 2000
MAX_CERTS = 200
MAX_CHALLENGES = 100
MAX_REMEMBERED_IDS = 20000


MAX_MESSAGE = 1000
MAX_HOLD_DOUBLINGS = 30  # 2**30 * any hold is far past flap_max_hold_s; keeps the float finite


def ok(**data: Any) -> dict[str, Any]:
    return {"ok": True, **data}


@dataclass
class Applied:
    result: dict[str, Any]
    events: list[Event]


def _repair_legacy_service(d: dict[str, Any]) -> dict[str, Any]:
    """State written before strict validation may hold a backend capacity of inf/NaN (the
    API accepted `max_rps: 1e999`); the model now refuses it, so restoring would fail and the
    node could not start. Such a capacity meant nothing usable: restore it as 0 (not declared)."""
    backends = d.get("backends")
    if isinstance(backends, dict):
        for b in backends.values():
            if isinstance(b, dict) and isinstance(b.get("max_rps"), float) and not math.isfinite(b["max_rps"]):
                b["max_rps"] = 0.0
    return d


class ClusterState:
    """Services, backends, members, health observations, lease and audit log."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.members: dict[str, Member] = {}
        self.events: list[Event] = []
        self.event_seq = 0
        self.seeded = False
        self.applied_ids: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.index = 0  # number of commands applied (informational)
        # per (service, backend) -> {node_id: {"up": bool, "at": float, "detail": str}}
        self.observations: dict[str, dict[str, dict[str, Any]]] = {}
        self.verdicts: dict[str, dict[str, Any]] = {}
        self.lease: dict[str, Any] = {}
        self.live_members: list[str] | None = None  # None: every registered member counts
        self.extra: dict[str, Any] = {}  # forward-compatible bag for later features
        # named API tokens: name -> {"name", "role", "hash", "at", "by"}; never the token itself
        self.tokens: dict[str, dict[str, Any]] = {}
        # TLS certificates: name -> {"name", "chain", "key_sealed", "sans", "not_after", ...};
        # the key only sealed with the cluster secret (halb/certs/sealing.py)
        self.certs: dict[str, dict[str, Any]] = {}
        # ACME (halb/certs/acme_*.py): orders by certificate name, the account per directory
        # (key sealed), and the HTTP-01 answers every node serves, by token
        self.acme_orders: dict[str, dict[str, Any]] = {}
        self.acme_accounts: dict[str, dict[str, Any]] = {}
        self.acme_challenges: dict[str, dict[str, Any]] = {}
        # frontends: name -> {"name", "port", "tls", "http_port", "redirect_https", "default_service",
        # "default_cert", "routes": [{"host", "path_prefix", "service"}]} (halb/control/frontend_state.py)
        self.frontends: dict[str, dict[str, Any]] = {}

    # --- snapshot codec ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "services": {k: to_primitive(v) for k, v in self.services.items()},
            "members": {k: to_primitive(v) for k, v in self.members.items()},
            "events": [to_primitive(e) for e in self.events],
            "event_seq": self.event_seq,
            "seeded": self.seeded,
            "applied_ids": list(self.applied_ids.items()),
            "index": self.index,
            "observations": self.observations,
            "verdicts": self.verdicts,
            "lease": self.lease,
            "live_members": self.live_members,
            "extra": self.extra,
            "tokens": self.tokens,
            "certs": self.certs,
            "acme_orders": self.acme_orders,
            "acme_accounts": self.acme_accounts,
            "acme_challenges": self.acme_challenges,
            "frontends": self.frontends,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterState":
        st = cls()
        st.services = {k: service_from(_repair_legacy_service(v)) for k, v in d.get("services", {}).items()}
        st.members = {k: Member(**v) for k, v in d.get("members", {}).items()}
        st.events = [Event(**e) for e in d.get("events", [])]
        st.event_seq = d.get("event_seq", 0)
        st.seeded = d.get("seeded", False)
        st.applied_ids = OrderedDict((k, v) for k, v in d.get("applied_ids", []))
        st.index = d.get("index", 0)
        st.observations = d.get("observations", {})
        st.verdicts = d.get("verdicts", {})
        st.lease = d.get("lease", {})
        st.live_members = d.get("live_members")
        st.extra = d.get("extra", {})
        tokens = d.get("tokens", {})
        st.tokens = tokens if isinstance(tokens, dict) else {}
        certs = d.get("certs", {})
        st.certs = certs if isinstance(certs, dict) else {}
        for key in ("acme_orders", "acme_accounts", "acme_challenges"):
            value = d.get(key, {})
            setattr(st, key, value if isinstance(value, dict) else {})
        frontends = d.get("frontends", {})
        st.frontends = frontends if isinstance(frontends, dict) else {}
        return st

    # --- applying ----------------------------------------------------------------------

    def apply(self, cmd: dict[str, Any]) -> Applied:
        """Apply one command; returns its result and the events it recorded.

        Never raises, whatever the command: every handler's args are validated in full
        (halb/control/commands.py) before the handler changes anything, so a refused
        command leaves the state as it was and answers ok=False with the reason.
        """
        self.index += 1
        try:
            op, args, cid = check_envelope(cmd)
        except CommandError as exc:
            return Applied({"ok": False, "error": exc.code, "message": exc.message}, [])
        if cid and cid in self.applied_ids:
            return Applied(dict(self.applied_ids[cid], duplicate=True), [])
        handler = self._handlers().get(op)
        seq_before = self.event_seq  # not len(self.events): at MAX_EVENTS the list is trimmed as it grows
        if handler is None:
            result = {"ok": False, "error": "invalid", "message": f"unknown operation {op!r}"[:MAX_MESSAGE]}
        else:
            try:
                result = handler(validate_command(op, args), cmd)
            except CommandError as exc:
                result = {"ok": False, "error": exc.code, "message": exc.message[:MAX_MESSAGE]}
            except (ModelError, KeyError, TypeError, ValueError) as exc:
                result = {"ok": False, "error": "invalid", "message": str(exc)[:MAX_MESSAGE]}
            except Exception as exc:  # a bug in a handler must not stop this replica's apply loop
                result = {"ok": False, "error": "internal",
                          "message": f"{op} failed inside the state machine: {type(exc).__name__}: {exc}"[:MAX_MESSAGE]}
        if cid:
            self.applied_ids[cid] = result
            while len(self.applied_ids) > MAX_REMEMBERED_IDS:
                self.applied_ids.popitem(last=False)
        recorded = self.event_seq - seq_before
        return Applied(result, self.events[-recorded:] if recorded else [])

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]]:
        return {
            "seed": self._seed,
            "service.add": self._service_add,
            "service.remove": self._service_remove,
            "service.update": self._service_update,
            "backend.add": self._backend_add,
            "backend.remove": self._backend_remove,
            "backend.state": self._backend_state,
            "backend.weight": self._backend_weight,
            "backend.limits": self._backend_limits,
            "member.register": self._member_register,
            "member.remove": self._member_remove,
            "event.record": self._event_record,
            "health.observe": self._health_observe,
            "health.observe_many": self._health_observe_many,
            "health.liveness": self._health_liveness,
            "health.release": self._health_release,
            "lease.renew": self._lease_renew,
            "lease.release": self._lease_release,
            "lease.contact": self._lease_contact,
            "token.add": self._token_add,
            "token.revoke": self._token_revoke,
            "cert.add": self._cert_add,
            "cert.remove": self._cert_remove,
            "acme.request": self._acme_request,
            "acme.renew": self._acme_renew,
            "acme.failed": self._acme_failed,
            "acme.account": self._acme_account,
            "acme.challenge": self._acme_challenge,
            "acme.challenge_clear": self._acme_challenge_clear,
            "frontend.add": lambda a, c: frontend_state.frontend_add(self, a, c),
            "frontend.remove": lambda a, c: frontend_state.frontend_remove(self, a, c),
            "route.add": lambda a, c: frontend_state.route_add(self, a, c),
            "route.remove": lambda a, c: frontend_state.route_remove(self, a, c),
        }

    def record(self, cmd: dict[str, Any], kind: str, message: str, **data: Any) -> None:
        self.event_seq += 1
        self.events.append(Event(seq=self.event_seq, at=float(cmd.get("at") or 0.0), by=str(cmd.get("by") or ""),
                                 node=str(cmd.get("node") or ""), kind=kind, message=message, data=data))
        if len(self.events) > MAX_EVENTS:
            del self.events[: len(self.events) - MAX_EVENTS]

    # --- lookups -----------------------------------------------------------------------

    def service(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise CommandError("not_found", f"service {name!r} does not exist")
        return svc

    def backend(self, service: str, name: str) -> Backend:
        svc = self.service(service)
        be = svc.backends.get(name)
        if be is None:
            raise CommandError("not_found", f"backend {name!r} does not exist in service {service!r}")
        return be

    # --- handlers ----------------------------------------------------------------------

    def _seed(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """Config seeds only an empty cluster, once; afterwards the replicated state rules."""
        if self.seeded or self.services:
            return ok(seeded=False)
        services = [service_from(s) for s in args["services"]]
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise CommandError("invalid", "seed lists a service twice")
        for i, svc in enumerate(services):
            clash = listen_conflict(services[:i], svc.listen, svc.mode) \
                or frontend_state.frontend_port_clash(self, svc.listen, svc.mode)
            if clash:
                raise CommandError("conflict", f"seed service {svc.name!r}: {clash}")
        for svc in services:
            self.services[svc.name] = svc
        self.seeded = True
        self.record(cmd, "cluster.seeded", f"cluster seeded from config with {len(services)} service(s)",
                    services=names)
        return ok(seeded=True)

    def _service_add(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        svc = service_from(args)
        if svc.name in self.services:
            raise CommandError("conflict", f"service {svc.name!r} already exists")
        clash = listen_conflict(self.services.values(), svc.listen, svc.mode) \
            or frontend_state.frontend_port_clash(self, svc.listen, svc.mode)
        if clash:
            raise CommandError("conflict", clash)
        self.services[svc.name] = svc
        self.seeded = True
        self.record(cmd, "service.added", f"service {svc.name} added ({svc.mode} on {svc.listen})", service=svc.name)
        return ok(service=to_primitive(svc))

    def _service_remove(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self.service(args["name"])
        users = frontend_state.service_users(self, svc.name)
        if users:
            raise CommandError("conflict", f"service {svc.name!r} is still routed to by {', '.join(users)}; "
                               "remove those routes (or change the default service) first")
        del self.services[svc.name]
        self.record(cmd, "service.removed", f"service {svc.name} removed", service=svc.name)
        return ok()

    def _service_update(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self.service(args["name"])
        candidate = copy.deepcopy(svc)
        for key in ("algorithm", "hash_key", "listen"):
            if key in args:
                setattr(candidate, key, args[key])
        if "options" in args:
            if not isinstance(candidate.options, dict):  # garbage restored from pre-validation state
                candidate.options = {}
            candidate.options.update(args["options"])
        candidate.__post_init__()
        candidate.validate()
        if "listen" in args:
            clash = listen_conflict(self.services.values(), candidate.listen, candidate.mode, exclude=svc.name) \
                or frontend_state.frontend_port_clash(self, candidate.listen, candidate.mode)
            if clash:
                raise CommandError("conflict", clash)
            users = frontend_state.service_users(self, svc.name)
            if not candidate.listen and users:
                raise CommandError("conflict", f"service {svc.name!r} is routed to by {', '.join(users)}: a routed "
                                   "service needs its listen address (its runtime on each node)")
        self.services[svc.name] = candidate
        self.record(cmd, "service.updated", f"service {svc.name} updated", service=svc.name,
                    changes={k: args[k] for k in args if k != "name"})
        return ok(service=to_primitive(candidate))

    def _backend_add(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self.service(args["service"])
        be = backend_from(args["backend"])
        if be.name in svc.backends:
            raise CommandError("conflict", f"backend {be.name!r} already exists in service {svc.name!r}")
        for other in svc.backends.values():
            if other.address == be.address:
                raise CommandError("conflict", f"address {be.address} is already backend {other.name!r} of {svc.name!r}")
        svc.backends[be.name] = be
        self.record(cmd, "backend.added", f"backend {svc.name}/{be.name} added at {be.address} (weight {be.weight})",
                    service=svc.name, backend=be.name)
        return ok(backend=to_primitive(be))

    def _backend_remove(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        be = self.backend(args["service"], args["name"])
        del self.services[args["service"]].backends[be.name]
        key = f"{args['service']}/{be.name}"
        self.observations.pop(key, None)
        self.verdicts.pop(key, None)
        self.record(cmd, "backend.removed", f"backend {key} removed", service=args["service"], backend=be.name)
        return ok()

    def _backend_state(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        state = args["state"]
        be = self.backend(args["service"], args["name"])
        previous, be.admin_state = be.admin_state, state
        self.record(cmd, f"backend.{state}", f"backend {args['service']}/{be.name}: {previous} -> {state}",
                    service=args["service"], backend=be.name, previous=previous, state=state)
        return ok(backend=to_primitive(be))

    def _backend_weight(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        weight = args["weight"]
        be = self.backend(args["service"], args["name"])
        previous, be.weight = be.weight, weight
        self.record(cmd, "backend.weight", f"backend {args['service']}/{be.name}: weight {previous} -> {weight}",
                    service=args["service"], backend=be.name, previous=previous, weight=weight)
        return ok(backend=to_primitive(be))

    def _backend_limits(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """Capacity the data plane enforces (0: none); given fields only, the rest stay."""
        be = self.backend(args["service"], args["name"])
        changes = []
        for key in ("max_conns", "max_rps"):
            if key in args:
                previous = getattr(be, key)
                setattr(be, key, args[key])
                changes.append(f"{key} {previous:g} -> {args[key]:g}")
        self.record(cmd, "backend.limits", f"backend {args['service']}/{be.name}: {', '.join(changes)}",
                    service=args["service"], backend=be.name, max_conns=be.max_conns, max_rps=be.max_rps)
        return ok(backend=to_primitive(be))

    def _member_register(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        member = Member(id=args["id"], raft=args["raft"], api=args["api"], listen_host=args["listen_host"])
        for other in self.members.values():
            if other.id != member.id and other.raft == member.raft:
                raise CommandError("conflict", f"raft address {member.raft} already belongs to member {other.id!r}")
        existing = self.members.get(member.id)
        if existing == member:
            return ok(member=to_primitive(member), changed=False)
        self.members[member.id] = member
        verb = "updated" if existing else "joined"
        self.record(cmd, f"member.{verb}", f"member {member.id} {verb} (raft {member.raft}, api {member.api})",
                    member=member.id)
        return ok(member=to_primitive(member), changed=True)

    def _member_remove(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        member = self.members.pop(args["id"], None)
        if member is None:
            raise CommandError("not_found", f"member {args['id']!r} does not exist")
        for obs in self.observations.values():
            obs.pop(member.id, None)
        self.record(cmd, "member.removed", f"member {member.id} removed (raft {member.raft})", member=member.id)
        return ok(member=to_primitive(member))

    def _event_record(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """Operational events that are facts rather than changes (leader elected, node started)."""
        self.record(cmd, args["kind"], args["message"], **args["data"])
        return ok()

    # --- API tokens (halb/tokens.py) ---------------------------------------------------------

    def _token_add(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        name = args["name"]
        if name in self.tokens:
            raise CommandError("conflict", f"token {name!r} already exists; revoke it first to replace it")
        if len(self.tokens) >= MAX_TOKENS:
            raise CommandError("conflict", f"the cluster already has {MAX_TOKENS} tokens")
        if any(t.get("hash") == args["hash"] for t in self.tokens.values()):
            raise CommandError("conflict", "a token with this hash already exists")
        self.tokens[name] = {"name": name, "role": args["role"], "hash": args["hash"],
                             "at": float(cmd.get("at") or 0.0), "by": str(cmd.get("by") or "")}
        self.record(cmd, "token.added", f"token {name} added with role {args['role']}", token=name,
                    role=args["role"])
        return ok(token={"name": name, "role": args["role"]})

    def _token_revoke(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        record = self.tokens.pop(args["name"], None)
        if record is None:
            raise CommandError("not_found", f"token {args['name']!r} does not exist")
        self.record(cmd, "token.revoked", f"token {args['name']} ({record.get('role')}) revoked",
                    token=args["name"], role=record.get("role"))
        return ok(token={"name": args["name"], "role": record.get("role")})

    # --- TLS certificates (halb/certs) ----------------------------------------------------

    def _cert_add(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        name, replace = args["name"], args["replace"]
        old = self.certs.get(name)
        if old is not None and not replace:
            raise CommandError("conflict", f"certificate {name!r} already exists; remove it first or replace it")
        if old is None and len(self.certs) >= MAX_CERTS:
            raise CommandError("conflict", f"the cluster already has {MAX_CERTS} certificates")
        record = {k: v for k, v in args.items() if k != "replace"}
        record.update(at=float(cmd.get("at") or 0.0), by=str(cmd.get("by") or ""))
        if old is not None and old.get("source") == "acme" and args["source"] == "file":
            self.acme_orders.pop(name, None)  # a file replaces an ACME certificate: renewals stop
        order = self.acme_orders.get(name)
        if order is not None and args["source"] == "acme":
            order.update(failures=0, failed_at=0.0, last_error="")
        self.certs[name] = record
        verb = "replaced" if old is not None else "added"
        self.record(cmd, f"cert.{verb}", f"certificate {name} {verb} ({args['source']}; "
                    f"{', '.join(args['sans'][:5])}{' ...' if len(args['sans']) > 5 else ''})",
                    cert=name, source=args["source"], not_after=args["not_after"],
                    fingerprint=args["fingerprint"])
        return ok(cert=cert_summary(record))

    def _cert_remove(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        record = self.certs.pop(args["name"], None)
        order = self.acme_orders.pop(args["name"], None)  # no renewals for a removed certificate
        if record is None and order is None:
            raise CommandError("not_found", f"certificate {args['name']!r} does not exist")
        if record is None:
            self.record(cmd, "cert.removed", f"ACME order {args['name']} removed (no certificate yet)",
                        cert=args["name"])
            return ok(cert={"name": args["name"]})
        self.record(cmd, "cert.removed", f"certificate {args['name']} removed", cert=args["name"])
        return ok(cert=cert_summary(record))

    def _acme_request(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        name = args["name"]
        cert = self.certs.get(name)
        if cert is not None and cert.get("source") != "acme":
            raise CommandError("conflict", f"certificate {name!r} was added from a file; remove it first "
                               "(or pick another name) to have it ordered over ACME")
        if name not in self.acme_orders and len(self.acme_orders) >= MAX_CERTS:
            raise CommandError("conflict", f"the cluster already has {MAX_CERTS} ACME orders")
        old = self.acme_orders.get(name)
        self.acme_orders[name] = dict(args, at=float(cmd.get("at") or 0.0), by=str(cmd.get("by") or ""),
                                      renew_requested=0.0, failures=0, failed_at=0.0, last_error="")
        verb = "changed" if old is not None else "requested"
        self.record(cmd, "cert.acme_requested", f"ACME certificate {name} {verb} for {', '.join(args['domains'])} "
                    f"from {args['directory']}", cert=name, domains=args["domains"])
        return ok(order=acme_order_summary(self.acme_orders[name]))

    def _acme_order(self, name: str) -> dict[str, Any]:
        order = self.acme_orders.get(name)
        if order is None:
            raise CommandError("not_found", f"certificate {name!r} has no ACME order (only ACME certificates renew)")
        return order

    def _acme_renew(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        order = self._acme_order(args["name"])
        order["renew_requested"] = float(cmd.get("at") or 0.0)
        self.record(cmd, "cert.acme_renew_requested", f"renewal of {args['name']} requested", cert=args["name"])
        return ok(order=acme_order_summary(order))

    def _acme_failed(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        order = self._acme_order(args["name"])
        order.update(failures=int(order.get("failures") or 0) + 1, failed_at=float(cmd.get("at") or 0.0),
                     last_error=args["reason"])
        serving = "the current certificate keeps serving" if args["name"] in self.certs else "no certificate yet"
        self.record(cmd, "cert.acme_failed", f"ACME order for {args['name']} failed ({serving}): {args['reason']}",
                    cert=args["name"], reason=args["reason"], failures=order["failures"])
        return ok(order=acme_order_summary(order))

    def _acme_account(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        if args["directory"] not in self.acme_accounts and len(self.acme_accounts) >= 10:
            raise CommandError("conflict", "the cluster already keeps ACME accounts for 10 directories")
        self.acme_accounts[args["directory"]] = dict(args)
        return ok()

    def _acme_challenge(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        now = float(cmd.get("at") or 0.0)
        for token in [t for t, c in self.acme_challenges.items() if c.get("expires", 0.0) < now]:
            del self.acme_challenges[token]  # a leader that died mid-order left these behind
        if args["token"] not in self.acme_challenges and len(self.acme_challenges) >= MAX_CHALLENGES:
            raise CommandError("conflict", f"{MAX_CHALLENGES} ACME challenges are pending already")
        self.acme_challenges[args["token"]] = {"key_authorization": args["key_authorization"],
                                               "expires": args["expires"]}
        return ok()

    def _acme_challenge_clear(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        for token in args["tokens"]:
            self.acme_challenges.pop(token, None)
        return ok()

    # --- health: observations -> majority verdicts, flap damping ---------------------------

    def voters(self) -> list[str]:
        """Members whose observations count: registered and (per the leader) reachable."""
        members = sorted(self.members)
        if self.live_members is None:
            return members
        live = [m for m in members if m in self.live_members]
        return live or members

    def _health_observe(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        service, name = args["service"], args["backend"]
        self.backend(service, name)
        self._store_observation(args, cmd)
        batch: list[dict[str, Any]] = []
        verdict = self._recompute(service, name, cmd, batch)
        self._flush_verdicts(batch, cmd)
        return ok(verdict=verdict)

    def _health_observe_many(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """Several observations of one node in one command (typically every instance of a
        server that failed together), so the verdicts they cause flip together and a whole
        server going down is one `server.down` event, not N `backend.verdict` events."""
        items = args["observations"]
        for item in items:  # every referenced backend must exist before anything changes
            self.backend(item["service"], item["backend"])
        for item in items:
            self._store_observation(item, cmd)
        batch: list[dict[str, Any]] = []
        verdicts = {f"{i['service']}/{i['backend']}": self._recompute(i["service"], i["backend"], cmd, batch)
                    for i in items}
        self._flush_verdicts(batch, cmd)
        return ok(verdicts=verdicts)

    def _store_observation(self, args: dict[str, Any], cmd: dict[str, Any]) -> None:
        service, name, up = args["service"], args["backend"], args["up"]
        node = str(cmd.get("node") or "")
        key = f"{service}/{name}"
        obs = self.observations.setdefault(key, {})
        previous = obs.get(node)
        obs[node] = {"up": up, "at": float(cmd.get("at") or 0.0), "detail": str(args.get("detail") or "")[:300]}
        # a node's first report of UP confirms the initial state (the view leaves "pending"):
        # not worth an audit event each, which at thousands of backends would flush the log
        if (previous is None and not up) or (previous is not None and previous["up"] != up):
            self.record(cmd, "health.observed", f"{node} observes {key} {'UP' if up else 'DOWN'}"
                        + (f" ({args.get('detail')})" if args.get("detail") and not up else ""),
                        service=service, backend=name, observer=node, up=up)

    def server_instances(self, server: str) -> list[tuple[str, str]]:
        """(service, backend) of every instance on `server`, across services."""
        return sorted((svc.name, be.name) for svc in self.services.values() for be in svc.backends.values()
                      if be.server == server)

    def _flush_verdicts(self, batch: list[dict[str, Any]], cmd: dict[str, Any]) -> None:
        """Record the verdict changes one command caused.

        When at least two instances of one server flip the same way in this command and
        afterwards *every* instance of that server has that verdict, the server went down
        (or came back) as a whole: one `server.down` / `server.up` event says so, with
        each instance's detail in its data. Otherwise (including a server with a single
        instance) each change is its own `backend.verdict` event, as before.
        """
        by_server: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for ch in batch:
            by_server.setdefault((ch["server"], ch["verdict"]), []).append(ch)
        grouped: set[int] = set()
        for (server, verdict), changes in sorted(by_server.items()):
            if len(changes) < 2:
                continue
            instances = self.server_instances(server)
            same = ("down", "held") if verdict == "down" else ("up",)
            if not all(self.verdicts.get(f"{s}/{b}", {}).get("verdict", "up") in same for s, b in instances):
                continue
            grouped.update(id(ch) for ch in changes)
            names = [f"{ch['service']}/{ch['backend']}" for ch in changes]
            services = sorted({ch["service"] for ch in changes})
            self.record(cmd, f"server.{verdict}",
                        f"server {server} {verdict.upper()} ({len(instances)} instance{'s' if len(instances) != 1 else ''}: "
                        f"{', '.join(names)}) by majority ({changes[0]['detail']})",
                        server=server, verdict=verdict, instances=len(instances), backends=names, services=services,
                        changes=[{k: ch[k] for k in ("service", "backend", "verdict", "down", "up")} for ch in changes])
        for ch in batch:
            if id(ch) not in grouped:
                self.record(cmd, "backend.verdict", f"{ch['service']}/{ch['backend']} is {ch['verdict'].upper()} "
                            f"by majority ({ch['detail']})", service=ch["service"], backend=ch["backend"],
                            verdict=ch["verdict"], down=ch["down"], up=ch["up"], server=ch["server"])

    def _health_liveness(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        live = args["live"]
        if live == self.live_members:
            return ok(changed=False)
        self.live_members = live
        self.record(cmd, "cluster.liveness", f"live members: {', '.join(live) or 'none'}", live=live)
        batch: list[dict[str, Any]] = []
        for service, svc in self.services.items():
            for name in svc.backends:
                self._recompute(service, name, cmd, batch)
        self._flush_verdicts(batch, cmd)
        return ok(changed=True)

    def _health_release(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """Leader-submitted when a flap hold may have expired; `at` decides, not apply time."""
        service, name = args["service"], args["backend"]
        self.backend(service, name)
        key = f"{service}/{name}"
        v = self.verdicts.get(key)
        at = float(cmd.get("at") or 0.0)
        if not v or v["verdict"] != "held" or at < v["hold_until"]:
            return ok(released=False)
        opts = self._damping(service)
        changed_during_hold = [t for t in v["changes"] if t >= v["hold_start"]]
        if len(changed_during_hold) >= 2:
            # still flapping: hold again, twice as long (capped)
            v["holds"] += 1
            hold = min(opts["hold_s"] * 2 ** min(v["holds"] - 1, MAX_HOLD_DOUBLINGS), opts["max_hold_s"])
            v["hold_start"], v["hold_until"] = at, at + hold
            self.record(cmd, "backend.held", f"{key} still flapping ({len(changed_during_hold)} changes during "
                        f"the hold): held down for {hold:g}s more", service=service, backend=name, hold_s=hold)
            return ok(released=False)
        v["verdict"], v["since"], v["changes"], v["hold_until"] = v["raw"], at, [], 0.0
        self.record(cmd, "backend.released", f"{key} released from flap hold: verdict {v['raw'].upper()}",
                    service=service, backend=name, verdict=v["raw"])
        return ok(released=True)

    def _damping(self, service: str) -> dict[str, float]:
        """Flap-damping settings; writes validate them (service_options.CONTROL_OPTIONS), and a
        bad value restored from an older snapshot falls back to the default instead of raising
        half-way through a health command."""
        o = self.services[service].options
        o = o if isinstance(o, dict) else {}
        out = {}
        for key, option, default in (("window_s", "flap_window_s", 30.0), ("changes", "flap_changes", 4),
                                     ("hold_s", "flap_hold_s", 10.0), ("max_hold_s", "flap_max_hold_s", 300.0)):
            try:
                out[key] = check_option(option, o.get(option, default), CONTROL_OPTIONS[option])
            except OptionError:
                out[key] = default
        return out

    def _recompute(self, service: str, name: str, cmd: dict[str, Any], batch: list[dict[str, Any]]) -> str:
        """Majority verdict of one backend; a plain UP/DOWN change is appended to `batch`
        (recorded by `_flush_verdicts`, which may fold a whole server into one event)."""
        key = f"{service}/{name}"
        at = float(cmd.get("at") or 0.0)
        obs = self.observations.get(key, {})
        voters = self.voters()
        # a voter that never reported a transition still holds the prober's initial view: up
        down = [m for m in voters if obs.get(m, {}).get("up", True) is False]
        up = [m for m in voters if m not in down]
        v = self.verdicts.setdefault(key, {"verdict": "up", "raw": "up", "since": at, "changes": [],
                                           "hold_start": 0.0, "hold_until": 0.0, "holds": 0})
        half = len(voters) / 2
        raw = "down" if len(down) > half else "up" if len(up) > half else v["raw"]
        if raw == v["raw"]:
            return v["verdict"]
        v["raw"] = raw
        opts = self._damping(service)
        v["changes"] = [t for t in v["changes"] if t > at - opts["window_s"]] + [at]
        detail = f"down: {', '.join(down) or 'none'}; up: {', '.join(up) or 'none'}"
        if v["verdict"] == "held":
            self.record(cmd, "backend.flap", f"{key} would be {raw.upper()} but is held down ({detail})",
                        service=service, backend=name, raw=raw, down=down, up=up)
            return "held"
        if len(v["changes"]) >= opts["changes"]:
            v["holds"] = v["holds"] + 1 if at - v["hold_until"] < opts["max_hold_s"] else 1
            hold = min(opts["hold_s"] * 2 ** min(v["holds"] - 1, MAX_HOLD_DOUBLINGS), opts["max_hold_s"])
            v["verdict"], v["since"], v["hold_start"], v["hold_until"] = "held", at, at, at + hold
            self.record(cmd, "backend.held", f"{key} flapping ({len(v['changes'])} changes in "
                        f"{opts['window_s']:g}s): held down for {hold:g}s ({detail})",
                        service=service, backend=name, hold_s=hold, down=down, up=up)
            return "held"
        v["verdict"], v["since"] = raw, at
        batch.append({"service": service, "backend": name, "server": self.services[service].backends[name].server,
                      "verdict": raw, "down": down, "up": up, "detail": detail})
        return raw

    # --- VIP quorum lease ---------------------------------------------------------------
    # The lease is only a log of who renews; *time* never enters apply. Holders measure
    # their own lease from when they submitted a renewal that committed (halb/announce).

    def _lease_renew(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        holder = args["holder"]
        lease = self.lease
        # pysyncobj forwards commands still queued on a deposed leader to the new leader, so
        # a renewal submitted in an old Raft term can commit later: it must change nothing
        term = args["term"]
        if term and term < int(lease.get("term", 0)):
            raise CommandError("conflict", f"stale lease renewal by {holder} from term {term} "
                                           f"(lease is at term {lease['term']})")
        previous = dict(lease)
        if lease.get("holder") != holder:
            lease.clear()
            lease.update(holder=holder, epoch=int(previous.get("epoch", 0)) + 1, renewals=0)
            handover = previous.get("last_op") == "release" and previous.get("released_held", False)
            lease["handover_from"] = previous.get("holder") if handover else None
            self.record(cmd, "vip.lease", f"VIP lease epoch {lease['epoch']}: {previous.get('holder') or 'nobody'} "
                        f"-> {holder}" + (" (planned hand-over)" if handover else ""),
                        holder=holder, previous=previous.get("holder"), epoch=lease["epoch"], handover=handover)
        lease["last_op"] = "renew"
        lease["renewals"] = int(lease.get("renewals", 0)) + 1
        lease["term"] = max(term, int(previous.get("term", 0)))
        return ok(epoch=lease["epoch"], first=lease["renewals"] == 1, handover_from=lease.get("handover_from"))

    def _lease_contact(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        """BGP mode's quorum contact (halb/announce/bgp.py): its commit is the proof that a
        majority accepted this node's write when it was submitted. Changes nothing, records
        nothing (a few per second per node would flood the audit log)."""
        return ok(node=args["node"])

    def _lease_release(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        holder = args["holder"]
        if self.lease.get("holder") != holder:
            return ok(released=False)
        held = args["held"]
        self.lease.update(last_op="release", released_held=held)
        self.record(cmd, "vip.released", f"{holder} released the VIP lease (it {'held' if held else 'did not hold'} "
                    "the VIP)", holder=holder, held=held, epoch=self.lease.get("epoch"))
        return ok(released=True)
