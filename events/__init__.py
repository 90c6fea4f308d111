"""Timer events: subscriptions and at-least-once delivery (:mod:`.delivery`), and the clients
flow engines use (:mod:`.client`, :mod:`.aio`: standard library only)."""
