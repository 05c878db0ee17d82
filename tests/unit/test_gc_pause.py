"""GcFreezer: a slow full collection leads to one gc.freeze() at the next freeze_if_due()."""
from __future__ import annotations

import gc
from typing import Iterator

import pytest

from halb.gc_pause import GcFreezer


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_slow_full_collection_freezes_once_at_the_next_call(unfrozen: None) -> None:
    keep = [[i] for i in range(50_000)]  # live objects a full collection has to walk
    f = GcFreezer(slow_s=0.0).install()  # every full collection counts as slow
    try:
        assert not f.freeze_if_due()  # nothing collected yet: nothing to do
        gc.collect(1)  # a young collection never triggers a freeze
        assert not f.due
        gc.collect()
        assert f.due
        assert f.freeze_if_due()
        assert gc.get_freeze_count() >= len(keep)
        assert f.freezes == 1
        assert not f.freeze_if_due()  # once per slow collection
    finally:
        f.uninstall()
    assert f._on_gc not in gc.callbacks


def test_fast_full_collections_freeze_nothing(unfrozen: None) -> None:
    f = GcFreezer(slow_s=60.0).install()
    try:
        gc.collect()
        assert not f.due and not f.freeze_if_due()
        assert gc.get_freeze_count() == 0
    finally:
        f.uninstall()
