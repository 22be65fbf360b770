"""Requests run in a worker thread and hand their events to the consumer through a bounded queue.

The model works in the worker while the consumer prints, writes files or sends them over HTTP, so a slow
consumer never stalls between tokens and a fast one never waits for more than the next event. Every event
stream ends with `Finished` (carrying the error text when the work failed, which is then re-raised).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

from lyra.engine.events import Finished, TextDelta
from lyra.engine.pipeline import prefetch

MAX_PENDING_EVENTS = 64  # events the worker may run ahead of its consumer


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def run_events(request_id: str, events: Iterable, max_pending: int = MAX_PENDING_EVENTS) -> Iterator:
    """Run the event generator `events` in a worker thread; yield its events, then `Finished(request_id)`.

    On an error the stream yields `Finished(request_id, error=...)` and then raises it. Closing the stream
    early stops the worker at its next event.
    """
    try:
        yield from prefetch(events, depth=max_pending)
    except Exception as error:
        yield Finished(request_id, error=f"{type(error).__name__}: {error}")
        raise
    yield Finished(request_id)


def text_events(request_id: str, deltas: Iterable[str]) -> Iterator[TextDelta]:
    """Text deltas (e.g. from `answer.stream_text`) as `TextDelta` events."""
    for delta in deltas:
        yield TextDelta(request_id, delta)
