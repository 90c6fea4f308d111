"""Direct sends' bookkeeping (events/direct.py): which subscriptions lag, so that the pump reads
them and fire batches do not overtake what waits for them in the database."""

from __future__ import annotations

from program_timer.events.direct import DirectSends, Send


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


def _ready(d: DirectSends, free: int) -> None:
    d.joined("s")
    d.drained("s", d.generation("s"))
    d.refresh({"s": free})


def test_what_a_batch_did_not_send_is_free_for_the_next_batch_before_its_push() -> None:
    d = DirectSends()
    _ready(d, 10)
    pushed: list[tuple[list[Send], dict[str, int]]] = []
    d.attach(lambda sends, held: pushed.append((sends, held)))
    taken = d.reserve()
    assert taken == {"s": 10} and d.reserve() == {}  # the window is the batch's while it runs
    sends = [Send("s", 1, b"{}"), Send("s", 2, b"{}")]
    d.deliver(sends, taken)
    # the next batch (a millisecond later at a steady rate) gets the 8 left, though the event
    # loop has not pushed yet: the 2 sent stay reserved, so the pump cannot fill them twice
    assert pushed == [(sends, {"s": 2})]
    assert d.reserved("s") == 2
    assert d.reserve() == {"s": 8}
    d.settle({"s": 8})  # that batch fired nothing
    d.settle(pushed[0][1], {"s": 2})  # the event loop pushed both
    assert d.reserved("s") == 0
    assert d.reserve() == {"s": 8}  # in flight now: the pump's next refresh counts them


def test_a_batch_that_sent_nothing_frees_its_window_and_does_not_wake_the_event_loop() -> None:
    d = DirectSends()
    _ready(d, 5)
    pushed: list[object] = []
    d.attach(lambda sends, held: pushed.append(sends))
    d.deliver([], d.reserve())
    assert pushed == [] and d.reserved("s") == 0
    assert d.reserve() == {"s": 5}
