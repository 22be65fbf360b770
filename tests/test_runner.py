"""Event streams: typed events from a worker thread, Finished at the end, errors surfaced."""

import threading

import pytest

from lyra.engine.events import Finished, TextDelta
from lyra.engine.runner import new_request_id, run_events, text_events


def test_events_come_from_a_worker_and_end_with_finished():
    threads = []

    def deltas():
        for word in ["Harbours ", "are ", "old."]:
            threads.append(threading.current_thread().name)
            yield word

    rid = new_request_id()
    events = list(run_events(rid, text_events(rid, deltas())))
    assert events[:-1] == [TextDelta(rid, "Harbours "), TextDelta(rid, "are "), TextDelta(rid, "old.")]
    assert events[-1] == Finished(rid)
    assert set(threads) == {"lyra-prefetch"}  # the work ran in the worker, not in the consumer


def test_errors_are_reported_then_raised():
    def broken():
        yield TextDelta("r", "partial")
        raise RuntimeError("model crashed")

    seen = []
    with pytest.raises(RuntimeError, match="model crashed"):
        for event in run_events("r", broken()):
            seen.append(event)
    assert seen == [TextDelta("r", "partial"), Finished("r", error="RuntimeError: model crashed")]


def test_answer_events_with_a_model(model_and_processor):
    from lyra.engine.answer import stream_text

    model, processor = model_and_processor
    inputs = processor(processor.apply_chat_template([{"role": "user", "content": "Hello"}]))
    direct = "".join(stream_text(model, processor, inputs, max_new_tokens=4))
    rid = new_request_id()
    events = list(run_events(rid, text_events(rid, stream_text(model, processor, inputs, max_new_tokens=4))))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == direct
    assert events[-1] == Finished(rid)
