"""Running model calls over parts of a batch: out-of-memory halving and error isolation, in one place.

Used by the model stage for both the vision encoder and generation, so the two
follow the same rules and a test of one checks both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from workers import schema
from workers.gpu_memory import even_chunks, is_out_of_memory

log = logging.getLogger(__name__)

__all__ = ["SizeCap", "run_in_parts"]


class SizeCap:
    """The largest per-call size known to fit after an out-of-memory error, recovering over time.

    After ``recover_after`` calls in a row succeed at the cap, it doubles (and
    disappears once at or above what was asked for): memory that was tight for
    one batch (a neighbour's spike, long prompts) is usually free again.  A
    doubling that runs out of memory again doubles ``recover_after``, so a
    replica that really is short of memory probes ever more rarely.
    """

    RECOVER_AFTER = 32

    def __init__(self) -> None:
        self.limit: int | None = None
        self.recover_after = self.RECOVER_AFTER
        self._successes = 0
        self._probing = False

    def apply(self, chunk: int) -> int:
        return min(chunk, self.limit) if self.limit else chunk

    def shrink(self, size: int) -> None:
        if self._probing:
            self.recover_after *= 2
        self.limit, self._successes, self._probing = max(1, size), 0, False

    def succeeded(self, size: int, wanted: int) -> None:
        if self.limit is None or size >= self.limit:
            self._probing = False  # what was probed fitted
        if self.limit is None or size < self.limit:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self.limit = None if self.limit * 2 >= wanted else self.limit * 2
            self._successes, self._probing = 0, True


def run_in_parts(
    items: list[Any],
    call: Callable[[list[Any]], None],
    image_of: Callable[[Any], int],
    failed: dict[int, tuple[str, str]],
    chunk: int,
    cap: SizeCap,
    after_oom: Callable[[], None],
    what: str,
) -> None:
    """``call`` over ``items`` in even parts of at most ``cap.apply(chunk)``; failures land in ``failed``.

    Out of memory halves the part (remembered in ``cap``) down to one item,
    which then fails as ``out_of_memory``.  Any other error retries the part
    item by item, so it lands on the image at fault as ``generation_failed``
    with the exception's type and message.  Items of images already in
    ``failed`` are skipped.  Never raises for a model error.
    """
    live = [x for x in items if image_of(x) not in failed]
    start = 0
    while start < len(live):
        # Re-planned after every part: an out-of-memory error in one lowers the cap for the rest.
        size = even_chunks(len(live) - start, cap.apply(chunk))[0]
        _run_part(live[start : start + size], call, image_of, failed, chunk, cap, after_oom, what)
        start += size


def _run_part(part, call, image_of, failed, chunk, cap, after_oom, what) -> None:
    part = [x for x in part if image_of(x) not in failed]
    if not part:
        return
    oom = None
    try:
        call(part)
        cap.succeeded(len(part), chunk)
        return
    except Exception as exc:  # noqa: BLE001 - the cause becomes the image's error row
        message = f"{type(exc).__name__}: {exc}"
        if not is_out_of_memory(exc):
            if len(part) == 1:
                failed[image_of(part[0])] = (schema.GENERATION_FAILED, message)
                return
            log.warning("%s failed for %d items, retrying one by one: %s", what, len(part), message)
            for item in part:
                _run_part([item], call, image_of, failed, chunk, cap, after_oom, what)
            return
        oom = message
    # Outside the except block, so the failed call's tensors can be freed first.
    after_oom()
    if len(part) == 1:
        failed[image_of(part[0])] = (schema.OUT_OF_MEMORY, f"out of memory {what} for the image alone: {oom}")
        return
    half = len(part) // 2
    cap.shrink(half)
    log.warning("out of memory %s %d items; retrying in halves of %d", what, len(part), half)
    for piece in (part[:half], part[half:]):
        _run_part(piece, call, image_of, failed, chunk, cap, after_oom, what)
