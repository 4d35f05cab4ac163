"""The replica's micro-batcher: one future per text, one drain task per busy period.

Cheaper per request than `@serve.batch` (no queue, no task or event per request): a text joins
the pending list; the first text of a busy period starts a drain task, which hands everything
pending (up to `max_batch_size`) to the model thread at once. Adaptive: an idle replica answers
at once (a lone text waits for nothing); while the model runs, arrivals pile up and form the
next batch. Only when the previous batch had more than one text (the replica is busy) does a
batch wait up to `batch_wait_timeout_s` to fill.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from serve.settings import BatchSettings

logger = logging.getLogger("ray.serve")


class ModelBatcher:
    """`run_batch` awaits one model call for a batch and answers in order; `on_batch`, if given,
    is told each batch's size (a metric). Settings come from `BatchSettings` (the Classifier's
    user_config); `configure` changes them live."""

    def __init__(self, run_batch: Callable[[list[str], list[int]], Awaitable[list]],
                 settings: BatchSettings | None = None, on_batch: Callable[[int], None] | None = None):
        self._run = run_batch
        self._on_batch = on_batch
        self.last_batch_size = 0
        self.configure(settings or BatchSettings())
        self._pending: list[tuple[str, int, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None

    def configure(self, settings: BatchSettings) -> None:
        """New limits take effect from the next batch."""
        self.max_batch_size, self.batch_wait_timeout_s = settings.max_batch_size, settings.batch_wait_timeout_s

    def submit(self, text: str, top_k: int) -> asyncio.Future:
        """A future for this text's answer (or a ModelError); must run on the event loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((text, top_k, fut))
        if self._drain is None:
            self._drain = loop.create_task(self._drain_pending())
        return fut

    async def _drain_pending(self) -> None:
        busy = False
        try:
            while self._pending:
                if busy and self.batch_wait_timeout_s > 0 and len(self._pending) < self.max_batch_size:
                    await asyncio.sleep(self.batch_wait_timeout_s)
                batch = self._pending[:self.max_batch_size]
                del self._pending[:len(batch)]
                try:
                    answers = await self._run([t for t, _, _ in batch], [k for _, k, _ in batch])
                except BaseException as err:  # the batch's requests fail; the batcher goes on
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    if isinstance(err, asyncio.CancelledError):
                        raise
                    continue
                for (_, _, fut), answer in zip(batch, answers):
                    if not fut.done():  # its client may have left
                        fut.set_result(answer)
                busy = len(batch) > 1
                self.last_batch_size = len(batch)
                if self._on_batch is not None:  # after the answers: a metric error fails no request
                    try:
                        self._on_batch(len(batch))
                    except Exception:
                        logger.exception("recording a batch's size failed")
        finally:
            self._drain = None
