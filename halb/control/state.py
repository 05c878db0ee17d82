"""The cluster state machine: pure, deterministic, transport-free.

Every change arrives as one command `{op, args, id, by, node, at}`. `apply` validates the
whole command before touching anything (so a rejected command changes nothing), never
reads a clock or a random source (every replica must compute the same result), and
remembers recent command ids so a retried command is applied once and answers with the
first result.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from halb.model import (
    ADMIN_STATES, Backend, Event, Member, ModelError, Service, backend_from, check_name, parse_hostport,
    service_from, to_primitive,
)

MAX_EVENTS = 2000
MAX_REMEMBERED_IDS = 20000


class CommandError(Exception):
    """A command the state machine refuses; `code` maps to an HTTP status in the API."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def ok(**data: Any) -> dict[str, Any]:
    return {"ok": True, **data}


@dataclass
class Applied:
    result: dict[str, Any]
    events: list[Event]


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
        self.extra: dict[str, Any] = {}  # forward-compatible bag for later features

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
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterState":
        st = cls()
        st.services = {k: service_from(v) for k, v in d.get("services", {}).items()}
        st.members = {k: Member(**v) for k, v in d.get("members", {}).items()}
        st.events = [Event(**e) for e in d.get("events", [])]
        st.event_seq = d.get("event_seq", 0)
        st.seeded = d.get("seeded", False)
        st.applied_ids = OrderedDict((k, v) for k, v in d.get("applied_ids", []))
        st.index = d.get("index", 0)
        st.observations = d.get("observations", {})
        st.verdicts = d.get("verdicts", {})
        st.lease = d.get("lease", {})
        st.extra = d.get("extra", {})
        return st

    # --- applying ----------------------------------------------------------------------

    def apply(self, cmd: dict[str, Any]) -> Applied:
        """Apply one command; returns its result and the events it recorded."""
        self.index += 1
        cid = cmd.get("id")
        if cid and cid in self.applied_ids:
            return Applied(dict(self.applied_ids[cid], duplicate=True), [])
        handler = self._handlers().get(cmd.get("op", ""))
        before = len(self.events)
        if handler is None:
            result = {"ok": False, "error": "invalid", "message": f"unknown operation {cmd.get('op')!r}"}
        else:
            try:
                result = handler(cmd.get("args") or {}, cmd)
            except CommandError as exc:
                result = {"ok": False, "error": exc.code, "message": exc.message}
            except (ModelError, KeyError, TypeError, ValueError) as exc:
                result = {"ok": False, "error": "invalid", "message": str(exc)}
        if cid:
            self.applied_ids[cid] = result
            while len(self.applied_ids) > MAX_REMEMBERED_IDS:
                self.applied_ids.popitem(last=False)
        return Applied(result, self.events[before:])

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
            "member.register": self._member_register,
            "member.remove": self._member_remove,
            "event.record": self._event_record,
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
        services = [service_from(s) for s in args.get("services", [])]
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise CommandError("invalid", "seed lists a service twice")
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
        self.services[svc.name] = svc
        self.seeded = True
        self.record(cmd, "service.added", f"service {svc.name} added ({svc.mode} on {svc.listen})", service=svc.name)
        return ok(service=to_primitive(svc))

    def _service_remove(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self.service(args["name"])
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
            if not isinstance(args["options"], dict):
                raise CommandError("invalid", "options must be an object")
            candidate.options.update(args["options"])
        candidate.__post_init__()
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
        if state not in ADMIN_STATES:
            raise CommandError("invalid", f"admin state {state!r} must be one of {', '.join(ADMIN_STATES)}")
        be = self.backend(args["service"], args["name"])
        previous, be.admin_state = be.admin_state, state
        self.record(cmd, f"backend.{state}", f"backend {args['service']}/{be.name}: {previous} -> {state}",
                    service=args["service"], backend=be.name, previous=previous, state=state)
        return ok(backend=to_primitive(be))

    def _backend_weight(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        weight = args["weight"]
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 10000:
            raise CommandError("invalid", f"weight {weight!r} must be an integer 0-10000")
        be = self.backend(args["service"], args["name"])
        previous, be.weight = be.weight, weight
        self.record(cmd, "backend.weight", f"backend {args['service']}/{be.name}: weight {previous} -> {weight}",
                    service=args["service"], backend=be.name, previous=previous, weight=weight)
        return ok(backend=to_primitive(be))

    def _member_register(self, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
        member = Member(id=check_name(args["id"], "member id"), raft=args["raft"], api=args["api"],
                        listen_host=str(args.get("listen_host") or ""))
        parse_hostport(member.raft, "raft address")
        parse_hostport(member.api, "api address")
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
        kind = check_name(str(args["kind"]), "event kind")
        self.record(cmd, kind, str(args["message"])[:500], **(args.get("data") or {}))
        return ok()
