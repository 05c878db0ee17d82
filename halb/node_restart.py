"""A node's hot restart and SIGHUP, wired to the Node's parts (protocol: halb/takeover.py,
the old process's server: halb/takeover_server.py, what SIGHUP may change:
halb/live_settings.py). docs/deploy.md explains it for operators.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from halb import takeover
from halb.takeover import SocketKey, TakeoverClient, TakeoverError, key_of, socket_path
from halb.takeover_server import HandoverHooks, TakeoverServer

log = logging.getLogger("halb.node")

LOCK_WAIT_S = 5.0  # the old process released node.lock before answering "released"; a forked
                   # snapshot writer of it may hold the lock a moment longer
SYNC_WAIT_S = 15.0  # Raft reopened: wait this long for a leader and the journal replayed


class ReadyReport:
    """``--ready-fd N``: one line for `halb node reload` ("READY <pid>" or "FAIL <why>")."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ")[:4000] + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ready(self) -> None:
        self._send(f"READY {os.getpid()}")

    def fail(self, why: str) -> None:
        self._send(f"FAIL {why}")


def bind_api_socket(host: str, port: int) -> socket.socket:
    """The admin API's listener: handed over by a replaced process, else bound here
    (SO_REUSEADDR, as aiohttp's TCPSite does)."""
    sock = takeover.take_inherited("api", host, port)
    if sock is not None:
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------ the new process
async def take_over(node: Any) -> None:
    """Replace the node process running on ``node.cfg.data_dir``. Raises TakeoverError (the
    old process keeps serving) until the old one has released Raft."""
    cfg = node.cfg
    client = TakeoverClient(socket_path(cfg.data_dir), node.node_id)
    node.takeover_client = client
    socks = await asyncio.to_thread(client.hello)
    takeover.inherited.socks.update(socks.socks)
    log.info("takeover: received %d listening sockets from pid %s: %s", len(socks.socks), client.old_pid,
             ", ".join(str(k) for k in socks.socks))
    node.sd_replaces(client.old_pid, client.systemd)
    await asyncio.to_thread(client.release)
    node.raft_released_by_old = True
    log.info("takeover: pid %s stopped Raft; opening %s", client.old_pid, cfg.data_dir)
    deadline = time.monotonic() + LOCK_WAIT_S
    while not node.lock.try_acquire():
        if time.monotonic() > deadline:
            raise TakeoverError(takeover.locked_message(node.lock, cfg.data_dir))
        await asyncio.sleep(0.05)
    node.open_raft()
    deadline = time.monotonic() + SYNC_WAIT_S
    while time.monotonic() < deadline:
        if node.raft.raft_status().leader is not None and node.raft.isReady():
            break
        await asyncio.sleep(0.02)
    else:
        log.warning("takeover: no Raft leader within %gs; serving from the journal as replayed", SYNC_WAIT_S)
    await node.start_serving()
    await asyncio.to_thread(client.ready)
    client.close()
    left = takeover.inherited.close_rest()
    if left:
        log.warning("takeover: closed inherited sockets nothing here listens on any more: %s",
                    ", ".join(str(k) for k in left))
    st = node.raft.raft_status()
    log.info("takeover from pid %s complete: node %s, raft %s, term %s", client.old_pid, node.node_id,
             st.self_addr, st.term)


# ------------------------------------------------------------------ the old process
def handover_hooks(node: Any) -> HandoverHooks:
    async def sockets() -> list[tuple[SocketKey, socket.socket]]:
        out = await node.dataplane.handover_sockets()
        if node.api_sock is not None:
            out.append((key_of("api", node.api_sock), node.api_sock))
        dns = getattr(node.announcer, "dns", None)  # announce mode dns: its UDP socket
        sock = dns.udp_socket() if dns is not None else None
        if sock is not None:
            out.append((key_of("udp", sock), sock))
        return out

    def can_hand_over() -> str | None:
        if node.stop_event.is_set():
            return "the node is stopping"
        if not node.listening:
            return "the node is still starting"
        return None

    def handed_over(pid: int) -> None:
        node.handed_over_to = pid
        if node.sd is not None:
            node.sd.quiet()
        node.request_stop(f"taken over by pid {pid}")

    def failed_after_release(why: str) -> None:
        log.error("%s; exiting 1 so the service manager restarts the node", why)
        node.exit_code = 1
        node.request_stop(why)

    def systemd() -> dict[str, object]:
        return node.sd.handover_info() if node.sd is not None else {}

    return HandoverHooks(node_id=node.node_id, sockets=sockets, release=lambda: release_raft(node),
                         handed_over=handed_over, failed_after_release=failed_after_release,
                         can_hand_over=can_hand_over, systemd=systemd)


async def release_raft(node: Any) -> None:
    """Leadership away first (writes go on at the other two without an election), then stop
    everything that writes to Raft, then Raft itself (journal flushed and closed) and the
    lock. The data plane keeps serving until the new process is ready; the admin API stops
    accepting (its connections already open are still answered)."""
    st = node.raft.raft_status()
    if st.leader is not None and st.leader == st.self_addr:
        try:
            result = await node.transfer_leadership(None, by=f"node:{node.node_id} (takeover)")
            log.info("takeover: leadership moved to %s", result.get("to"))
        except Exception as exc:  # WriteError or transport trouble: an election will follow instead
            log.warning("takeover: could not move leadership first (%s); the others elect a leader", exc)
    for task in node._tasks:
        if task.get_name() in ("converge", "routing", "dataplane-check"):
            task.cancel()
    for part in ("dp_guard", "announcer", "load_meter", "health"):
        obj = getattr(node, part, None)
        if obj is not None:
            try:
                await obj.stop()
            except Exception:
                log.exception("takeover: stopping %s", part)
            node.stopped_parts.add(part)  # stop_components must not stop it twice
    if node.api_site is not None:  # new API connections wait in the (shared) queue for the
        await node.api_site.stop()  # new process instead of meeting a Raft-less one
    await asyncio.to_thread(node.raft.destroy_synchronous)
    node.raft_stopped = True
    node.lock.release()
    log.info("takeover: Raft stopped, journal closed, %s released", node.lock.path)


def start_server(node: Any) -> TakeoverServer:
    server = TakeoverServer(node.cfg.data_dir, handover_hooks(node))
    server.start()
    return server


# ------------------------------------------------------------------ SIGHUP
async def reload_settings(node: Any) -> None:
    """Re-read the config file; apply what can change live; log and record what cannot."""
    from halb.config import ConfigError, load_config
    from halb.live_settings import plan_reload

    path = node.cfg.path
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("SIGHUP: %s; nothing changed", exc)
        await _record(node, "node.reload_failed", f"{node.node_id}: SIGHUP: {exc}; nothing changed",
                      {"file": exc.file, "key": exc.key, "reason": exc.reason})
        return
    plan = plan_reload(node.cfg, new)
    log.info("SIGHUP: re-read %s: %s", path, plan.summary())  # before a new log level hides it
    if "log_level" in plan.live:
        logging.getLogger().setLevel(new.log_level)
        node.cfg.log_level = new.log_level
    if "api.write_timeout" in plan.live:
        node.cfg.api.write_timeout = new.api.write_timeout
        if node.writer is not None:
            node.writer.timeout = new.api.write_timeout
    # the access log: on/off/moved as the file says, and always reopened (logrotate renames
    # the file, then sends SIGHUP); the worker processes reopen theirs too
    node.cfg.dataplane.access_log = new.dataplane.access_log
    node.cfg.dataplane.access_log_buffer = new.dataplane.access_log_buffer
    if node.dataplane is not None and (new.dataplane.access_log or node.dataplane.access_log is not None):
        node.dataplane.set_access_log(new.dataplane.access_log, new.dataplane.access_log_buffer)
    await _record(node, "node.reload", f"{node.node_id}: SIGHUP: {plan.summary()}",
                  {"applied": sorted(plan.live), "needs_takeover": plan.needs_takeover,
                   "seed_only": plan.seed_only, "identity": plan.identity})


async def _record(node: Any, kind: str, message: str, data: dict[str, Any]) -> None:
    from halb.control.writer import WriteError

    if node.writer is None or getattr(node, "raft_stopped", False):
        return
    try:
        await node.writer.write("event.record", {"kind": kind, "message": message[:1000], "data": data},
                                by=f"node:{node.node_id}")
    except WriteError as exc:  # no quorum: the log line above is the record
        log.warning("SIGHUP: could not record the event: %s", exc.message)
