"""Answer ACME HTTP-01 challenges on every HTTP listener, from the replicated state.

The leader orders certificates, but the CA's validator may connect to any balancer (a DNS
name with several A records, a VIP that moves, BGP): every node serves
``GET /.well-known/acme-challenge/TOKEN`` with the key authorization the leader published
through Raft (halb/certs/acme_manager.py). Only exact tokens are answered; any other path
under the prefix goes to the service as before, so a backend's own ACME client keeps
working when the cluster has no order running.

Cost on the hot path: one dict truth test per request (the table is empty except while an
order is being validated).
"""
from __future__ import annotations

from typing import Any

PREFIX = b"/.well-known/acme-challenge/"


def answer(conn: Any, ex: Any, answers: dict[bytes, bytes]) -> bool:
    """Send the key authorization for the request's token; False when it is not ours."""
    url = ex.url
    if not url.startswith(PREFIX) or ex.method not in (b"GET", b"HEAD"):
        return False
    token = url[len(PREFIX):].split(b"?", 1)[0]
    body = answers.get(token)
    if body is None:
        return False
    close = ex.close_after or not ex.keep_alive or not ex.body_done
    head = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\n",
            b"Content-Length: %d\r\n" % len(body)]
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    ex.response_started = True
    ex.close_after = close
    out = b"".join(head) + (b"" if ex.method == b"HEAD" else body)
    ex.status, ex.head_out = 200, out
    if not conn.closed:
        conn._w(out)
    conn.finish(ex)
    return True
