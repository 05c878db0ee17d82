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
