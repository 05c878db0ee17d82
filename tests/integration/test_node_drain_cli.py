"""`halb node drain NODE`: reaches that node's own API; outside bgp mode it says why not
(the bgp behaviour itself is tested in tests/netns/test_bgp.py)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


def test_node_drain_names_the_mode_it_needs_and_unknown_nodes(cluster_factory):
    c = cluster_factory(n=3)
    out = c.cli("node", "drain", "n2", check=False)
    assert out.returncode == 1 and 'needs [announce] mode = "bgp"' in out.stderr, out
    out = c.cli("node", "drain", "n9", check=False)
    assert out.returncode == 1 and "no member 'n9'" in out.stderr and "n1, n2, n3" in out.stderr, out
