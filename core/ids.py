"""Random (version 4) UUIDs, many at a time: one ``os.urandom`` call per batch, not per id."""

from __future__ import annotations

import os
import uuid


def uuid4_strings(n: int) -> list[str]:
    raw = os.urandom(16 * n)
    out = []
    for i in range(n):
        value = int.from_bytes(raw[16 * i : 16 * i + 16], "big")
        # set the version (4) and the RFC 4122 variant bits, as uuid.uuid4() does
        value &= ~(0xC000 << 48)
        value |= 0x8000 << 48
        value &= ~(0xF000 << 64)
        value |= 4 << 76
        out.append(str(uuid.UUID(int=value)))
    return out
