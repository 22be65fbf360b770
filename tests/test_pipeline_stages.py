"""Bounded prefetching between engine stages."""

import threading
import time

import pytest

from lyra.engine.pipeline import prefetch


def test_order_errors_and_bound():
    assert list(prefetch(range(50), depth=3, transform=lambda x: x * 2)) == [2 * i for i in range(50)]
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    it = prefetch(source(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) <= 4  # the producer waits: at most depth items queued plus one in hand
    it.close()

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))


def test_overlaps_producer_and_consumer():
    """The producer works on item 1 while the consumer still holds item 0."""
    started_second = threading.Event()

    def work(x):
        if x == 1:
            started_second.set()
        return x

    it = prefetch(range(3), depth=1, transform=work)
    assert next(it) == 0
    assert started_second.wait(timeout=10)
    assert list(it) == [1, 2]


def test_worker_uses_the_callers_thread_count():
    import torch

    callers = torch.get_num_threads()
    setter = threading.Thread(target=lambda: torch.set_num_threads(1))  # like the VAD's temporary setting
    setter.start()
    setter.join()
    seen = list(prefetch(range(2), transform=lambda _: torch.get_num_threads()))
    assert seen == [callers, callers]
