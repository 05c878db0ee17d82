"""VIP mode: the holder whose data-plane worker processes crash-loop (the node itself alive
and in the majority) fails its self-check and hands the VIP over; the lab drill's
``dataplane`` fault, once (issue 16). Real namespaces, root only; ~30 s."""
from __future__ import annotations

from typing import Iterator

import pytest

from halb.lab.failover import FailoverRun, dataplane_ok

from .helpers import lab_failover_run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverRun]:
    with lab_failover_run(tmp_path_factory, "w-", workers=2) as fr:
        yield fr


def test_holder_whose_workers_crash_loop_hands_the_vip_over(run: FailoverRun) -> None:
    t = run.trial("dataplane")  # restores too: the faulted node restarted, every self-check passing
    assert t.new_holder not in (None, t.holder)
    assert t.max_holders == 1
    # the check failed (third worker death; the pool respawns after 0.5 s and 1 s) before the VIP moved
    assert t.detect_s is not None and t.garp_s is not None and 0 < t.detect_s < t.garp_s
    assert run.cluster.alive(t.holder)
    assert all(dataplane_ok(run.cluster.status(lb)) for lb in run.cluster.lbs)
