"""VIP lifetime, release, GARP, ARP sysctls and pre-bound listeners in real namespaces."""
from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

import pytest

from halb.announce.garp import arp_probe
from halb.announce.sysctl import enable_nonlocal_bind, read_sysctl, run_in_netns, write_sysctls
from halb.announce.vip import VipAnnouncer, freebind_socket
from .helpers import connect_errno, neigh_mac, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def announcers(clean_lab):
    made: list[VipAnnouncer] = []

    def make(host: str) -> VipAnnouncer:
        a = VipAnnouncer("eth0", clean_lab.vip, netns=clean_lab.ns(host))
        made.append(a)
        return a

    yield make
    for a in made:
        a.close(release=True)


def test_kernel_removes_unrenewed_vip(clean_lab, announcers):
    a = announcers("lb1")
    a.hold(valid_lft=1)
    t0 = time.monotonic()
    assert a.is_held() and a.valid_lifetime() == 1
    gone = wait_for(lambda: not a.is_held(), timeout=5, step=0.01)
    assert gone is not None, "kernel did not remove the VIP within 5 s"
    print(f"kernel removed the unrenewed VIP after {gone:.3f}s")
    assert 0.5 < time.monotonic() - t0 < 3.0


def test_vip_stays_while_renewed_and_release_is_immediate(clean_lab, announcers):
    a = announcers("lb1")
    t_end = time.monotonic() + 3.0
    renewals = 0
    while time.monotonic() < t_end:
        a.hold()
        renewals += 1
        assert a.is_held()
        time.sleep(0.2)
    assert renewals >= 10
    assert a.is_held()
    t0 = time.monotonic()
    assert a.release() is True
    assert not a.is_held()
    print(f"release took {1000 * (time.monotonic() - t0):.1f} ms")
    assert a.release() is False  # idempotent


def test_async_acquire_renew_release(clean_lab, announcers):
    a = announcers("lb1")

    async def main() -> tuple[bool, bool, float]:
        await a.acquire(refresh_after=0.3, refresh_count=1)
        # the loop stays responsive while netlink work runs on the worker thread
        lag = 0.0
        for _ in range(8):
            t = time.monotonic()
            await a.ahold()
            await asyncio.sleep(0.05)
            lag = max(lag, time.monotonic() - t)
        held = await a.ais_held()
        await a.arelease()
        return held, await a.ais_held(), lag

    held, after, lag = asyncio.run(main())
    assert held and not after
    print(f"max renew+sleep(50ms) iteration {1000 * lag:.1f} ms")


def test_garp_moves_client_neighbour_entry(clean_lab, announcers):
    lab = clean_lab
    lb1, lb2 = announcers("lb1"), announcers("lb2")
    mac1, mac2 = lab.hosts["lb1"].mac, lab.hosts["lb2"].mac
    assert lb1.mac() == mac1 and lb2.mac() == mac2
    lb1.hold(valid_lft=30)  # long lifetime: this test is about ARP, not expiry
    assert connect_errno(lab, "client", lab.vip) == errno.ECONNREFUSED
    assert neigh_mac(lab, "client", lab.vip) == mac1

    # move to lb2 WITHOUT GARP: the client keeps the stale MAC (the control case)
    lb1.release()
    lb2.hold(valid_lft=30)
    time.sleep(1.0)
    assert neigh_mac(lab, "client", lab.vip) == mac1, "entry changed without GARP: test cannot discriminate"

    # now GARP from lb2: the client's entry moves to lb2's MAC
    t0 = time.monotonic()
    lb2.send_garp(count=1)
    switched = wait_for(lambda: neigh_mac(lab, "client", lab.vip) == mac2, timeout=3)
    assert switched is not None, f"client still at {neigh_mac(lab, 'client', lab.vip)} after GARP"
    print(f"client neighbour entry switched {1000 * (time.monotonic() - t0):.1f} ms after GARP")
    assert connect_errno(lab, "client", lab.vip) == errno.ECONNREFUSED  # reaches lb2 now

    # and back to lb1 with a full burst, straight after (well within the 1 s lock time)
    lb2.release()
    lb1.hold(valid_lft=30)
    t0 = time.monotonic()
    lb1.send_garp(count=3, interval=0.05)
    assert wait_for(lambda: neigh_mac(lab, "client", lab.vip) == mac1, timeout=3) is not None
    print(f"switch back incl. burst: {1000 * (time.monotonic() - t0):.1f} ms")


def test_arp_sysctls_make_only_holder_answer(clean_lab, announcers):
    lab = clean_lab
    client_ip = lab.hosts["client"].ip
    # a non-holder has the VIP on lo (as LVS-DR style setups do); defaults first
    defaults = {"net.ipv4.conf.all.arp_ignore": 0, "net.ipv4.conf.all.arp_announce": 0,
                "net.ipv4.conf.eth0.arp_ignore": 0, "net.ipv4.conf.eth0.arp_announce": 0}
    for h in ("lb1", "lb2"):
        write_sysctls(defaults, lab.ns(h))
    lab.ip("lb2", "addr", "add", f"{lab.vip}/32", "dev", "lo")
    lb1 = announcers("lb1")
    lb1.hold(valid_lft=30)

    def probe() -> set[str]:
        return {a.mac for a in run_in_netns(lab.ns("client"),
                                            lambda: arp_probe("eth0", lab.vip, client_ip, 0.4))}

    assert probe() == {lab.hosts["lb1"].mac, lab.hosts["lb2"].mac}  # both answer: the bug
    lb1.set_arp_sysctls()
    announcers("lb2").set_arp_sysctls()
    for h in ("lb1", "lb2"):
        assert read_sysctl("net.ipv4.conf.all.arp_ignore", lab.ns(h)) == "1"
        assert read_sysctl("net.ipv4.conf.eth0.arp_announce", lab.ns(h)) == "2"
    assert read_sysctl("net.ipv4.conf.all.arp_ignore", lab.ns("lb3")) == "0"  # per namespace
    assert probe() == {lab.hosts["lb1"].mac}  # only the holder
    lb1.release()
    assert probe() == set()  # and nobody once it lets go


def _serve_once(sock: socket.socket, payload: bytes, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (socket.timeout, OSError):
            continue
        with conn:
            conn.sendall(payload)


def test_freebind_listener_serves_once_vip_added(clean_lab, announcers):
    lab = clean_lab
    port = 8080
    # bound on the VIP while nobody holds it (IP_FREEBIND, no sysctl)
    listener = run_in_netns(lab.ns("lb1"), lambda: freebind_socket(lab.vip, port))
    stop = threading.Event()
    thread = threading.Thread(target=_serve_once, args=(listener, b"hello from lb1", stop), daemon=True)
    thread.start()

    def fetch() -> bytes | None:
        def go() -> bytes | None:
            try:
                with socket.create_connection((lab.vip, port), timeout=0.5) as s:
                    return s.recv(100)
            except OSError:
                return None
        return run_in_netns(lab.ns("client"), go)

    try:
        assert fetch() is None  # nobody answers for the VIP yet
        a = announcers("lb1")
        t0 = time.monotonic()
        a.hold()
        a.send_garp(count=1)
        got = None
        deadline = time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            a.hold()
            got = fetch()
        assert got == b"hello from lb1"
        print(f"pre-bound listener served {1000 * (time.monotonic() - t0):.0f} ms after the VIP was added")
    finally:
        stop.set()
        thread.join(2)
        listener.close()


def test_nonlocal_bind_sysctl(clean_lab):
    lab = clean_lab

    def plain_bind() -> int:
        s = socket.socket()
        try:
            s.bind((lab.vip, 8081))
            return 0
        except OSError as exc:
            return exc.errno
        finally:
            s.close()

    assert run_in_netns(lab.ns("lb3"), plain_bind) == errno.EADDRNOTAVAIL
    enable_nonlocal_bind(lab.ns("lb2"))
    assert read_sysctl("net.ipv4.ip_nonlocal_bind", lab.ns("lb2")) == "1"
    assert run_in_netns(lab.ns("lb2"), plain_bind) == 0
    assert read_sysctl("net.ipv4.ip_nonlocal_bind", lab.ns("lb3")) == "0"
