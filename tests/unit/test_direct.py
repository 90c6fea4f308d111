"""Direct sends' bookkeeping (events/direct.py): which subscriptions lag, so that the pump reads
them and fire batches do not overtake what waits for them in the database."""

from __future__ import annotations

from program_timer.events.direct import DirectSends


def test_a_joined_subscription_lags_until_drained_and_gets_no_direct_sends_meanwhile() -> None:
    d = DirectSends()
    d.joined("s")
    d.refresh({"s": 10})
    assert d.lagging("s")
    assert d.reserve() == {}
    d.drained("s", d.generation("s"))
    assert not d.lagging("s")
    taken = d.reserve()
    assert taken == {"s": 10}


def test_a_drain_read_before_a_newer_lag_does_not_clear_it() -> None:
    d = DirectSends()
    d.joined("s")
    seen = d.generation("s")
    d.waiting({"s"})  # a batch left deliveries while the pump was reading
    d.drained("s", seen)
    assert d.lagging("s")


def test_deliveries_left_waiting_lag_only_subscriptions_attached_here() -> None:
    d = DirectSends()
    d.joined("here")
    d.drained("here", d.generation("here"))
    d.waiting({"here", "elsewhere"})
    assert d.lagging("here") and not d.lagging("elsewhere")
    d.forget("here")
    d.waiting({"here"})
    assert not d.lagging("here")


def test_turned_on_again_every_attached_subscription_lags_first() -> None:
    d = DirectSends()
    d.joined("s")
    d.drained("s", d.generation("s"))
    d.enabled = False  # another daemon shares the database: its fires reach s via the pump
    d.enabled = False
    assert not d.lagging("s")
    d.enabled = True
    assert d.lagging("s")
