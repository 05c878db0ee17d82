"""Drill format for servers: [cluster.backends], kill-server/start-server, event/resilience."""
from __future__ import annotations

from pathlib import Path

import pytest

from halb.chaos.drill import DrillError, load_drill, parse_drill
from halb.chaos.target import LocalOptions

REPO = Path(__file__).resolve().parents[2]


def test_kill_server_a_drill_parses():
    d = load_drill(REPO / "chaos" / "drills" / "kill-server-a.toml")
    assert d.cluster.backends["A2"] == {"server": "A", "max_rps": 35.0}
    assert [s.action for s in d.method][:3] == ["wait-until", "kill-server", "wait-until"]
    opts = LocalOptions(backend_options=d.cluster.backends)
    assert opts.backends == ("A", "A2", "B", "C") and opts.server_of("A2") == "A"
    assert LocalOptions().server_of("B") == "B"


@pytest.mark.parametrize("step, key", [
    ({"action": "wait-until", "condition": "resilience", "is": "fine"}, "method[0].is"),
    ({"action": "wait-until", "condition": "event"}, "method[0].kind"),
    ({"action": "kill-server"}, "method[0].target"),
])
def test_bad_steps_name_the_key(step, key):
    with pytest.raises(DrillError) as exc:
        parse_drill(Path("x.toml"), {"title": "t", "method": [step]})
    assert exc.value.key == key


def test_unknown_backend_key_is_an_error():
    with pytest.raises(DrillError) as exc:
        parse_drill(Path("x.toml"), {"title": "t", "cluster": {"backends": {"A": {"srv": "A"}}},
                                     "method": [{"action": "pause", "seconds": 1}]})
    assert exc.value.key == "cluster.backends.A.srv"
