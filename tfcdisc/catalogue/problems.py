"""How every report lists what it skipped: exact counts, the first `LISTED` one by one.

The BSON reader, the offset index, the build's shards and prediction each count what
they skip and list examples (byte offset, _id, image, why); they all list through here,
so every report is capped the same way and a merged report stays capped.
"""

from __future__ import annotations

from typing import Iterable

LISTED = 1000


def note(listing: list, item) -> None:
    """Appends ``item`` unless ``listing`` already holds `LISTED` (count it separately)."""
    if len(listing) < LISTED:
        listing.append(item)


def extend(listing: list, items: Iterable) -> None:
    """Appends items until ``listing`` holds `LISTED`."""
    for item in items:
        if len(listing) >= LISTED:
            return
        listing.append(item)


def first(items: Iterable) -> list:
    """The first `LISTED` items, as lists (JSON-ready)."""
    out: list = []
    extend(out, (list(x) for x in items))
    return out
