"""Which subscriptions an event goes to: filters on connector and persona (absent = any)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

FilterKey = tuple[str | None, str | None]


class Router:
    """Subscriptions indexed by their (connector, persona) filter: matching is four lookups."""

    def __init__(self, subscriptions: Iterable[Any]) -> None:
        self._by_filter: dict[FilterKey, list[str]] = defaultdict(list)
        for sub in subscriptions:
            self._by_filter[(sub.filter_connector_idn, sub.filter_persona_id)].append(
                sub.subscription_id
            )

    def __bool__(self) -> bool:
        return bool(self._by_filter)

    def match(self, connector_idn: str, persona_id: str) -> list[str]:
        found: list[str] = []
        for key in (
            (None, None),
            (connector_idn, None),
            (None, persona_id),
            (connector_idn, persona_id),
        ):
            subs = self._by_filter.get(key)
            if subs:
                found.extend(subs)
        return found
