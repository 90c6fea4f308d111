"""Random (version 4) UUIDs, many at a time: one ``os.urandom`` call per batch, not per id."""

from __future__ import annotations

import os


def uuid4_strings(n: int) -> list[str]:
    """``n`` random UUIDs as ``uuid.uuid4()`` makes them (version 4, RFC 4122 variant), as
    text. The bits are set on the random bytes and the text cut from their hex in place of
    ``str(uuid.UUID(int=…))``, whose checks cost more than the rest of a fire's id."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # variant 10x (RFC 4122)
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-"
        f"{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]
