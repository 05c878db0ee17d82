"""A proxied socket that is lost before its link exists must still end that link."""
from halb.chaos.toxiproxy.proxy import Side


class RecordingLink:
    def __init__(self) -> None:
        self.fed: list[bytes | None] = []

    def feed(self, item: bytes | None) -> None:
        self.fed.append(item)


def test_reset_before_the_link_is_attached_still_ends_the_link() -> None:
    side = Side("upstream")
    side.data_received(b"bye")
    side.connection_lost(ConnectionResetError())  # no eof_received: the peer reset
    link = RecordingLink()
    side.attach_reader(link)  # type: ignore[arg-type]
    assert link.fed == [b"bye", None]


def test_eof_then_loss_before_the_link_ends_it_once() -> None:
    side = Side("upstream")
    side.data_received(b"bye")
    side.eof_received()
    side.connection_lost(None)
    link = RecordingLink()
    side.attach_reader(link)  # type: ignore[arg-type]
    assert link.fed == [b"bye", None]


class ResumingLink(RecordingLink):
    """Link's pause bookkeeping (pause_reasons / src_resume), as far as Side uses it."""

    def __init__(self, side: Side) -> None:
        super().__init__()
        self.side = side
        self.pause_reasons: set[str] = set()

    def src_resume(self, reason: str) -> None:
        self.pause_reasons.discard(reason)
        if not self.pause_reasons and self.side.transport is not None:
            self.side.transport.resume_reading()


def test_a_fin_after_early_bytes_is_read_once_the_link_attaches() -> None:
    """Real sockets on uvloop: the upstream answers and closes before its link exists; the
    early bytes pause reading, and attaching the link must resume it so the FIN is seen."""
    import asyncio

    import uvloop

    async def main() -> list[bytes | None]:
        async def answer_and_close(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"bye")
            await w.drain()
            w.close()

        server = await asyncio.start_server(answer_and_close, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, side = await asyncio.get_running_loop().create_connection(lambda: Side("upstream"),
                                                                             "127.0.0.1", port)
        try:
            for _ in range(200):  # until the early bytes arrived (and paused reading)
                if side.early:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the FIN is in the socket, unread
            assert side.early == [b"bye"] and not transport.is_reading()
            link = ResumingLink(side)
            side.attach_reader(link)  # type: ignore[arg-type]
            for _ in range(200):
                if None in link.fed:
                    break
                await asyncio.sleep(0.01)
            return list(link.fed)  # closing below feeds the end once more (connection_lost)
        finally:
            transport.close()
            server.close()

    assert uvloop.run(main()) == [b"bye", None]
