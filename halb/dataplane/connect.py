"""Open one upstream connection with a callback and a timer: no Task, no ``wait_for``.

TCP mode opens a backend connection for every client connection, so the fixed cost of
"connect with a timeout" is paid per connection. ``asyncio.wait_for(loop.create_connection())``
inside a Task costs two Tasks (each copies the context and looks up the running loop, a
``getpid`` syscall), a waiter future, a timer handle and the done-callback plumbing; measured
at 10-15 % of a proxied connection's CPU when every request opens a new connection.

``open_connection`` drives the loop's own ``create_connection`` coroutine by hand: each time
it awaits a future, the future's done callback resumes it. The connect itself stays the
loop's (under uvloop: libuv's non-blocking connect, already the minimum of system calls:
socket, setsockopt(TCP_NODELAY), connect, getsockopt(SO_ERROR), plus the getsockname and
getpeername uvloop caches for every transport). A timeout cancels the awaited future exactly
as a Task would on cancellation, so the coroutine cleans up (closes its socket) itself.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

# done(protocol, None) on success, done(None, exc) on failure; TimeoutError for the timer
Done = Callable[[Any, "BaseException | None"], None]


class PendingConnect:
    """One connection attempt in flight; ``cancel()`` abandons it (closes the socket)."""

    __slots__ = ("coro", "done", "fut", "timer", "finished", "timed_out", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], done: Done,
                 timeout: float) -> None:
        self.loop = loop
        self.coro = coro
        self.done = done
        self.fut: asyncio.Future[Any] | None = None
        self.finished = False
        self.timed_out = False
        self.timer = loop.call_later(timeout, self._timeout) if timeout > 0 else None
        self._step()

    def _step(self, _fut: Any = None) -> None:
        if self.finished:
            return
        self.fut = None
        try:
            fut = self.coro.send(None)
        except StopIteration as stop:
            self._finish(stop.value[1], None)
            return
        except asyncio.CancelledError:
            self._finish(None, asyncio.TimeoutError() if self.timed_out else ConnectionAbortedError("connect cancelled"))
            return
        except Exception as exc:  # OSError and whatever the loop raises: the caller decides
            self._finish(None, exc)
            return
        if fut is None:  # a bare yield (sleep(0)): resume on the next iteration
            self.loop.call_soon(self._step)
            return
        self.fut = fut
        fut.add_done_callback(self._step)

    def _finish(self, proto: Any, exc: BaseException | None) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.done(proto, exc)

    def _timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        self.cancel()

    def cancel(self) -> None:
        """Stop the attempt: the awaited future is cancelled and the coroutine unwinds
        (closing its socket); ``done`` still gets called, with an error."""
        if self.finished:
            return
        fut = self.fut
        if fut is not None:
            fut.cancel()  # its done callback resumes the coroutine, which raises CancelledError
            return
        self.coro.close()  # between two steps: unwind it here
        self._finish(None, asyncio.TimeoutError() if self.timed_out else ConnectionAbortedError("connect cancelled"))


def open_connection(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str,
                    port: int, timeout: float, done: Done) -> PendingConnect:
    """Connect to host:port; ``done`` is called exactly once (from the loop, or at once)."""
    return PendingConnect(loop, loop.create_connection(factory, host, port), done, timeout)
