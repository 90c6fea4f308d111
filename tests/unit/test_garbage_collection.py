"""The daemon's settings of the garbage collector (scheduler/daemon.py)."""

from __future__ import annotations

import gc

from program_timer.scheduler import daemon


def test_startup_objects_are_frozen_and_young_collections_come_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        gc.unfreeze()
        daemon._freeze_startup_objects()
        assert gc.get_freeze_count() > 0, "what start-up left alive is out of collections"
        assert gc.get_threshold() == (daemon.YOUNG_COLLECTION, *threshold[1:])
        assert threshold[0] < daemon.YOUNG_COLLECTION
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
