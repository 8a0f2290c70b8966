"""Batching: concurrent requests of one signature gathered into one model call, as TensorFlow Serving's."""

import asyncio
import logging

import numpy as np

from cxrkeras import savedmodel
from cxrkeras.serving.protocol import ApiError, invalid

log = logging.getLogger("cxrkeras.serving")
CLOSE = object()  # queued by Batcher.close


def api_error(error):
    """An exception from a model call as the error TensorFlow Serving would answer."""
    import tensorflow as tf

    if isinstance(error, ApiError):
        return error
    if isinstance(error, tf.errors.InvalidArgumentError):
        return invalid(savedmodel.error_message(error))
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return ApiError(429, savedmodel.error_message(error))
    log.error("model call failed", exc_info=error)
    return ApiError(500, f"{type(error).__name__}: {savedmodel.error_message(error)}")


class Batcher:
    """Gathers concurrent calls of one signature into one model call, as TensorFlow Serving's batching does.

    A batch takes every request already queued, then waits for the demand
    seen since the last batch closed (the most instances waiting for an
    answer at once) up to `batch_timeout_ms` after its first request, and
    closes at `max_batch_size` instances. It runs on `executor` (one thread:
    inference never blocks the event loop); requests arriving meanwhile form
    the next batch. When a batch fails on bad input, its requests are rerun
    one by one so only the bad one gets the error.

    Why wait for the demand seen last time rather than a fixed time (issue
    23): clients that wait for their answer come back together, but spread
    over a few milliseconds (the event loop writes their answers one by one,
    each client parses its answer and sends the next request, and the event
    loop reads and checks each body). A fixed 2 ms from the first request
    closed most batches before the last of 4 clients arrived: the latecomers
    waited a whole model call in the queue, then went as a small batch of
    their own, so 4 clients x 1 image ran half-size batches (58% of the
    model's batched rate) at two model calls of latency (p99 50 ms). Waiting
    for as many instances as were waiting at once during the last call puts
    every client in each call, one call of latency; a lone client waits for
    no one (its batch is full at 1), and the timeout (10 ms: well over the
    spread of clients coming back, well under a model call) only bounds the
    wait of the one round after clients go away.
    """

    def __init__(self, run, settings, executor, on_batch=None):
        self.run = run  # {input: array [n, ...]} -> {output: array [n, ...]}, blocking
        self.settings = settings
        self.executor = executor
        self.on_batch = on_batch  # called with (instances, seconds) after each model call
        self.queue = asyncio.Queue()
        self.pending = 0  # instances submitted and not yet answered
        self.peak = 0  # the most instances pending at once since the last batch closed: a batch waits for so many
        self.worker = None
        self.closed = False

    async def submit(self, inputs):
        if self.closed:
            raise ApiError(503, "This version was unloaded; send the request again.")
        size = len(next(iter(inputs.values())))
        limit = self.settings.max_batch_size * self.settings.max_enqueued_batches
        if self.pending + size > limit:
            raise ApiError(
                429,
                f"The batch scheduling queue to which this task was submitted is full "
                f"({self.pending} instances waiting; --max-enqueued-batches): retry later.",
            )
        if self.worker is None:
            self.worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self.pending += size
        self.peak = max(self.peak, self.pending)
        self.queue.put_nowait((inputs, size, future))
        try:
            return await future
        finally:
            self.pending -= size

    async def _work(self):
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first = carry or await self.queue.get()
            if first is CLOSE:
                return
            tasks, size, carry = [first], first[1], None
            limit = self.settings.max_batch_size
            deadline = loop.time() + self.settings.batch_timeout_ms / 1000
            while size < limit:
                task = await self._next(deadline if size < self.peak else None)
                if task is None:
                    break
                if task is CLOSE or size + task[1] > limit:
                    carry = task
                    break
                tasks.append(task)
                size += task[1]
            self.peak = self.pending  # this batch's and those queued behind it, until more come
            await self._execute([t for t in tasks if not t[2].done()])

    async def _next(self, deadline):
        """The next queued task; None when none is queued and `deadline` (event-loop time, or None: now) passed."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if deadline is None:
            return None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), remaining)
        except asyncio.TimeoutError:
            return None

    async def _execute(self, tasks):
        if not tasks:
            return
        try:
            batch = {k: np.concatenate([t[0][k] for t in tasks]) for k in tasks[0][0]}
        except ValueError:  # shapes that don't stack: one call each
            for task in tasks:
                await self._execute([task])
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            outputs = await loop.run_in_executor(self.executor, self.run, batch)
        except Exception as e:
            error = api_error(e)
            if len(tasks) > 1 and error.status == 400:
                for task in tasks:
                    await self._execute([task])
                return
            for _, _, future in tasks:
                if not future.done():
                    future.set_exception(error)
            return
        if self.on_batch:
            self.on_batch(len(next(iter(batch.values()))), loop.time() - started)
        start = 0
        for inputs, size, future in tasks:
            if not future.done():
                future.set_result({k: v[start : start + size] for k, v in outputs.items()})
            start += size

    def close(self):
        """Answer what is queued, then stop; later calls get 503."""
        self.closed = True
        self.queue.put_nowait(CLOSE)
