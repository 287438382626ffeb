"""The batcher (serving.batching): collect_batch and GraphWorker, tested directly."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import GraphWorker, LoneRun, Settle, collect_batch


def run(coro):
    return asyncio.run(coro)


def test_takes_queued_items_up_to_max_size_without_waiting():
    async def main():
        q = asyncio.Queue()
        for i in range(5):
            q.put_nowait(i)
        t0 = time.perf_counter()
        batch = await collect_batch(q, max_size=3, max_wait_s=5.0)
        return batch, time.perf_counter() - t0, q.qsize()

    batch, elapsed, left = run(main())
    assert batch == [0, 1, 2] and left == 2 and elapsed < 0.5


def test_waits_up_to_the_deadline_for_stragglers():
    async def main():
        q = asyncio.Queue()
        q.put_nowait("first")
        asyncio.get_running_loop().call_later(0.02, q.put_nowait, "second")
        t0 = time.perf_counter()
        batch = await collect_batch(q, max_size=8, max_wait_s=0.15)
        return batch, time.perf_counter() - t0

    batch, elapsed = run(main())
    assert batch == ["first", "second"]
    assert 0.13 <= elapsed < 1.0  # it kept waiting for more until the deadline


def test_full_batch_returns_before_the_deadline():
    async def main():
        q = asyncio.Queue()
        q.put_nowait(0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, q.put_nowait, 1)
        t0 = time.perf_counter()
        batch = await collect_batch(q, max_size=2, max_wait_s=5.0)
        return batch, time.perf_counter() - t0

    batch, elapsed = run(main())
    assert batch == [0, 1] and elapsed < 1.0


def test_lone_item_does_not_wait_when_nothing_else_is_coming():
    async def main():
        q = asyncio.Queue()
        q.put_nowait("only")
        t0 = time.perf_counter()
        batch = await collect_batch(q, max_size=8, max_wait_s=5.0, more_coming=lambda: False)
        return batch, time.perf_counter() - t0

    batch, elapsed = run(main())
    assert batch == ["only"] and elapsed < 0.5


def test_waits_while_more_are_coming():
    async def main():
        q = asyncio.Queue()
        q.put_nowait(0)
        coming = {"n": 1}

        def arrive():
            q.put_nowait(1)
            coming["n"] = 0

        asyncio.get_running_loop().call_later(0.02, arrive)
        return await collect_batch(q, max_size=8, max_wait_s=5.0, more_coming=lambda: coming["n"] > 0)

    assert run(main()) == [0, 1]


def test_a_batch_waits_for_the_clients_just_answered_and_no_longer():
    # Nothing queued and nothing being decoded, but two clients were just answered: the batch waits
    # until both are back and is cut then, not at the window's end; clients answered longer ago
    # than the window are not waited for; and no wait passes the deadline.
    async def main():
        loop = asyncio.get_running_loop()
        q = asyncio.Queue()
        settle = Settle(0.3)

        def back(item):
            settle.arrived()
            q.put_nowait(item)

        settle.answered(time.monotonic())
        settle.answered(time.monotonic())
        q.put_nowait(0)
        loop.call_later(0.02, back, 1)
        loop.call_later(0.04, back, 2)
        t0 = time.perf_counter()
        both_back = await collect_batch(q, 8, 5.0, more_coming=lambda: False, settle=settle)
        both_back_s = time.perf_counter() - t0

        settle.answered(time.monotonic())
        await asyncio.sleep(0.35)  # longer than the window
        q.put_nowait(3)
        t0 = time.perf_counter()
        lapsed = await collect_batch(q, 8, 5.0, more_coming=lambda: False, settle=settle)
        lapsed_s = time.perf_counter() - t0
        expected = settle.expected

        settle.answered(time.monotonic())
        q.put_nowait(4)
        t0 = time.perf_counter()
        capped = await collect_batch(q, 8, 0.1, more_coming=lambda: False, settle=settle)
        capped_s = time.perf_counter() - t0
        return both_back, both_back_s, lapsed, lapsed_s, expected, capped, capped_s

    both_back, both_back_s, lapsed, lapsed_s, expected, capped, capped_s = run(main())
    assert both_back == [0, 1, 2] and 0.035 <= both_back_s < 0.25
    assert lapsed == [3] and lapsed_s < 0.02 and expected == 0
    assert capped == [4] and 0.09 <= capped_s < 0.25


def test_blocks_until_the_first_item():
    async def main():
        q = asyncio.Queue()
        asyncio.get_running_loop().call_later(0.05, q.put_nowait, "late")
        t0 = time.perf_counter()
        batch = await collect_batch(q, max_size=4, max_wait_s=0.0)
        return batch, time.perf_counter() - t0

    batch, elapsed = run(main())
    assert batch == ["late"] and elapsed >= 0.04


def test_no_item_is_lost_or_duplicated_under_racing_deadlines():
    async def main():
        q = asyncio.Queue()
        n = 400
        rng = random.Random(0)

        async def produce():
            for i in range(n):
                q.put_nowait(i)
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.choice([0, 0.0005, 0.001]))

        producer = asyncio.create_task(produce())
        got = []
        while len(got) < n:
            got += await collect_batch(q, max_size=rng.randint(1, 7), max_wait_s=rng.choice([0, 0.0003, 0.001]))
        await producer
        return got

    assert run(main()) == list(range(400))


def _worker(run_fn, executor, batches, **kw):
    return GraphWorker(
        "double",
        run_fn,
        executor,
        max_batch_size=kw.pop("max_batch_size", 8),
        max_wait_s=kw.pop("max_wait_s", 0.05),
        on_batch=lambda size, wait, t, rows: batches.append(size),
        **kw,
    )


def test_worker_batches_concurrent_requests_and_returns_each_its_own_result():
    def double(batch):
        return [batch * 2, batch.sum(axis=(1, 2))]

    async def main():
        batches = []
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(double, pool, batches)
            worker.start()
            inputs = [np.full((2, 3), i, dtype=np.float32) for i in range(20)]
            results = await asyncio.gather(*(worker.submit(x) for x in inputs))
            await worker.stop()
        return inputs, results, batches

    inputs, results, batches = run(main())
    for x, (doubled, total) in zip(inputs, results):
        assert np.array_equal(doubled, x * 2) and total == x.sum()
    assert sum(batches) == 20 and max(batches) > 1 and max(batches) <= 8


def _closed_loop(settle_window_s: float, rounds: int = 5, clients: int = 6, queued_beside: bool = False) -> list[int]:
    """Batch sizes when ``clients`` each send their next request 2*i ms after their answer (as wrk
    does, and any client that keeps a fixed number of requests in flight), every entry and answer
    counted in ``Settle`` (as InferenceService.run does). ``queued_beside``: a second
    group of as many clients is already queued whenever a batch is handed out."""

    def slow(batch):
        time.sleep(0.03)
        return [batch]

    async def main():
        settle = Settle(settle_window_s)
        batches: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(
                slow,
                pool,
                batches,
                max_batch_size=clients * (2 if queued_beside else 1),
                max_wait_s=0.5,
                more_coming=lambda: False,
                settle=settle,
            )
            worker.start()

            async def client(i: int, start_s: float = 0.0) -> None:
                await asyncio.sleep(start_s)
                for _ in range(rounds):
                    settle.arrived()
                    await worker.submit(np.full(2, i, dtype=np.float32))
                    settle.answered(time.monotonic())
                    await asyncio.sleep(0.002 * i)

            groups = [client(i) for i in range(clients)]
            if queued_beside:  # arrives while the first batch runs; queued from then on
                groups += [client(i, start_s=0.02) for i in range(clients)]
            await asyncio.gather(*groups)
            await worker.stop()
        return batches

    return run(main())


def test_clients_answered_together_come_back_into_one_batch_after_a_settle():
    # Cut as soon as nothing is queued, the first client back is a batch of its own and the rest
    # queue behind it: the clients split into groups whose answers and next requests the event
    # loop handles beside the other group's run (on a CPU, slowing it). With a settle window the
    # batch waits until they are all back, and each batch holds every client.
    settled = _closed_loop(settle_window_s=0.02)
    assert settled == [6] * 5
    unsettled = _closed_loop(settle_window_s=0.0)
    assert sum(unsettled) == 30 and max(unsettled[1:]) < 6


def test_a_batch_handed_out_is_answered_before_a_queued_one_is_cut():
    # A second group is queued when a batch's results are handed out. Its clients' handlers run in
    # the loop's next turn, so the batcher looks after them before judging the quiet: the queued
    # group then waits for the group just answered, and both run as one batch.
    # (The queued group's last request came 25 ms before the hand-out, more than the window.)
    assert _closed_loop(settle_window_s=0.015, rounds=3, clients=3, queued_beside=True) == [3, 6, 6, 3]


def test_worker_failure_fails_that_batch_only():
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return [batch + 1]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(flaky, pool, [], max_wait_s=0.0)
            worker.start()
            with pytest.raises(RuntimeError, match="boom"):
                await worker.submit(np.zeros(2, dtype=np.float32))
            (out,) = await worker.submit(np.zeros(2, dtype=np.float32))
            await worker.stop()
        return out

    assert np.array_equal(run(main()), np.ones(2))


def test_cancelled_request_is_skipped_and_others_still_answered():
    seen = []

    def record(batch):
        seen.append(len(batch))
        return [batch]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(record, pool, [], max_wait_s=0.05)
            worker.start()
            doomed = asyncio.create_task(worker.submit(np.zeros(1, dtype=np.float32)))
            kept = asyncio.create_task(worker.submit(np.ones(1, dtype=np.float32)))
            await asyncio.sleep(0)  # both enqueued
            doomed.cancel()
            (out,) = await kept
            await worker.stop()
        return out

    assert np.array_equal(run(main()), np.ones(1))
    assert seen == [1]  # the cancelled one never reached the model


# --- a request alone on the server runs past the queue -------------------------------------


def test_a_lone_request_runs_inline_and_requests_arriving_together_are_batched():
    import threading

    threads, batch_sizes, lone_sizes = [], [], []
    admitted = {"n": 0}

    def queued(batch):  # the batching loop's run, in the executor
        threads.append(threading.get_ident())
        return [batch * 2]

    def alone_run(batch):  # the lone run
        threads.append(threading.get_ident())
        lone_sizes.append(len(batch))
        return [batch * 2]

    async def request(worker, value):
        # What the service does: admit (count), then submit; none of these awaits before submit.
        admitted["n"] += 1
        try:
            (out,) = await worker.submit(np.full(3, value, dtype=np.float32))
            return out
        finally:
            admitted["n"] -= 1

    async def main():
        loop_thread = threading.get_ident()
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(queued, pool, batch_sizes, max_wait_s=0.0)
            worker.lone = LoneRun(alone_run, alone=lambda: admitted["n"] <= 1 and not worker.running, inline=True)
            worker.start()
            first = await request(worker, 1)
            await asyncio.sleep(0)  # its metrics are written on the loop's next turn, after its answer
            inline = threads == [loop_thread] and lone_sizes == [1] and batch_sizes == [1]
            threads.clear()
            # Ten requests admitted in one loop turn: none may decide it is alone.
            together = await asyncio.gather(*(request(worker, v) for v in range(10)))
            await worker.stop()
        return first, inline, together, loop_thread

    first, inline, together, loop_thread = run(main())
    assert np.array_equal(first, np.full(3, 2.0)) and inline
    assert [float(out[0]) for out in together] == [2.0 * v for v in range(10)]
    assert lone_sizes == [1]  # only the first request ran alone
    assert sum(batch_sizes[1:]) == 10 and max(batch_sizes[1:]) > 1
    assert loop_thread not in threads  # the batches ran in the executor


def test_with_arrivals_counted_a_lone_request_decides_at_once_and_requests_read_together_are_batched():
    # The fast path's requests: the service counts those read but not yet admitted, so a lone
    # one runs without yielding a loop turn first, and one read beside others still batches.
    import threading

    batch_sizes, lone_sizes = [], []
    admitted, arrived = {"n": 0}, {"n": 0}

    def alone_run(batch):
        lone_sizes.append(len(batch))
        return [batch * 2]

    async def request(worker, value):
        arrived["n"] -= 1  # admitted: no longer only read
        admitted["n"] += 1
        try:
            (out,) = await worker.submit(np.full(3, value, dtype=np.float32), arrivals_counted=True)
            return out
        finally:
            admitted["n"] -= 1

    async def main():
        turns = {"n": 0}

        async def count_turns():
            while True:
                turns["n"] += 1
                await asyncio.sleep(0)

        with ThreadPoolExecutor(1) as pool:
            worker = _worker(lambda b: [b * 2], pool, batch_sizes, max_wait_s=0.0)
            worker.lone = LoneRun(
                alone_run, alone=lambda: admitted["n"] <= 1 and not arrived["n"] and not worker.running, inline=True
            )
            worker.start()
            counter = asyncio.get_running_loop().create_task(count_turns())
            await asyncio.sleep(0)
            arrived["n"] = 1
            before = turns["n"]
            first = await request(worker, 1)
            lone_turns = turns["n"] - before
            arrived["n"] = 10  # ten read in one loop turn: none is alone, the first included
            together = await asyncio.gather(*(request(worker, v) for v in range(10)))
            counter.cancel()
            await worker.stop()
        return first, lone_turns, together, threading.get_ident()

    first, lone_turns, together, _ = run(main())
    assert np.array_equal(first, np.full(3, 2.0)) and lone_turns == 0  # answered within one loop turn
    assert [float(out[0]) for out in together] == [2.0 * v for v in range(10)]
    assert lone_sizes == [1] and sum(batch_sizes[1:]) == 10 and max(batch_sizes[1:]) > 1


def test_a_lone_request_on_a_long_graph_runs_in_the_executor_and_its_errors_reach_the_caller():
    import threading

    threads = []

    def alone_run(batch):
        threads.append(threading.get_ident())
        if batch[0, 0] < 0:
            raise ValueError("bad input")
        return [batch + 1]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(lambda b: [b], pool, [], max_wait_s=0.0)
            worker.lone = LoneRun(alone_run, alone=lambda: True, inline=False)
            worker.start()
            (out,) = await worker.submit(np.zeros(2, dtype=np.float32))
            with pytest.raises(ValueError, match="bad input"):
                await worker.submit(np.full(2, -1, dtype=np.float32))
            running_after = list(worker.running)
            await worker.stop()
        return out, threading.get_ident(), running_after

    out, loop_thread, running_after = run(main())
    assert np.array_equal(out, np.ones(2)) and running_after == []
    assert len(threads) == 2 and loop_thread not in threads


def test_a_padded_worker_runs_one_shape_and_answers_each_request_with_its_own_row():
    # GPU providers (Graph.pads_batches): every batch padded to max_batch_size, so the session
    # never sees a new input shape; the lone request keeps its batch of 1 (its own session).
    shapes, lone_shapes, batch_sizes, rows_ran = [], [], [], []
    admitted = {"n": 0}

    def queued(batch):
        images, thresholds = batch  # a graph with two inputs (the fused cascade's) pads both
        shapes.append((images.shape, thresholds.shape))
        return [images.sum(axis=1) + thresholds]

    def alone_run(batch):
        lone_shapes.append(batch[0].shape)
        return queued(batch)

    async def request(worker, value):
        admitted["n"] += 1
        try:
            (out,) = await worker.submit((np.full(3, value, dtype=np.float32), np.float32(value)))
            return float(out)
        finally:
            admitted["n"] -= 1

    async def main():
        with ThreadPoolExecutor(1) as pool:

            def on_batch(size, wait, t, rows):
                batch_sizes.append(size)
                rows_ran.append(rows)

            worker = GraphWorker("pad", queued, pool, 8, 0.0, on_batch=on_batch, pad_to=8)
            worker.lone = LoneRun(alone_run, alone=lambda: admitted["n"] <= 1 and not worker.running, inline=True)
            worker.start()
            first = await request(worker, 1)
            shapes.clear()
            together = await asyncio.gather(*(request(worker, v) for v in range(11)))
            await worker.stop()
        return first, together

    first, together = run(main())
    assert first == 4.0 and lone_shapes == [(1, 3)]
    assert rows_ran[0] == 1 and set(rows_ran[1:]) == {8}  # what the service's time model is fed
    assert together == [4.0 * v for v in range(11)]  # padding rows never leak into answers
    assert shapes and set(shapes) == {((8, 3), (8,))}  # one shape, whatever the batch size
    assert sum(batch_sizes[1:]) == 11  # metrics count requests, not padding


def test_a_batch_being_gathered_still_counts_as_waiting_and_is_cancelled_on_stop():
    # While a batch waits for the clients just answered, its items are out of the queue but not in
    # ORT: the service's queue estimates (deadlines choose exits by them) and its "alone" check must
    # still see them — a first version that did not sent deadline requests under a 64-connection
    # burst to deeper exits than they could finish in time (82-84 % met instead of 96 %).
    async def main():
        settle = Settle(5.0)
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(lambda b: [b], pool, [], max_wait_s=5.0, more_coming=lambda: False, settle=settle)
            worker.start()
            settle.answered(time.monotonic())  # a client expected back: the batch waits
            futures = [asyncio.ensure_future(worker.submit(np.zeros(2, dtype=np.float32))) for _ in range(3)]
            await asyncio.sleep(0.05)
            gathering = (worker.queue.qsize(), worker.waiting(), [f.done() for f in futures])
            await worker.stop()
            await asyncio.sleep(0)
            return gathering, [f.cancelled() for f in futures]

    gathering, cancelled = run(main())
    assert gathering == (0, 3, [False] * 3)
    assert cancelled == [True] * 3


def test_a_request_queued_while_the_worker_stops_is_cancelled_not_left_waiting():
    # The batcher's wait for more items ran in a task of its own that stop() did not cancel: an item
    # it had already taken was in neither the batch nor the queue, and its request never finished.
    async def main():
        with ThreadPoolExecutor(1) as pool:
            worker = _worker(lambda b: [b], pool, [], max_wait_s=1.0, more_coming=lambda: True)
            worker.start()
            first = asyncio.ensure_future(worker.submit(np.zeros(2, dtype=np.float32)))
            await asyncio.sleep(0.05)  # gathering, waiting for more
            second = asyncio.ensure_future(worker.submit(np.zeros(2, dtype=np.float32)))
            await asyncio.sleep(0)  # its item is put; the wait's getter takes it
            await worker.stop()
            await asyncio.wait([first, second], timeout=1.0)
            return first.cancelled(), second.done() and second.cancelled()

    assert run(main()) == (True, True)
