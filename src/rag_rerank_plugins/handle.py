"""`ModelHandle`: one loaded model plus what makes it safe and cheap to share.

A handle validates input (before any model work), answers from its caches, computes a call's
repeated items once (:mod:`.cache`), counts, builds the one :class:`.engine.request.Request` of
each call, and hands it to its executor (:mod:`.engine.executor`): a scheduler whose device
worker is the only thread that runs the model, or the direct stage for models that declare
``thread_safe``. Counters live in :class:`.stats.SpecStats`, which the pool keeps across
releases so reloads show up as ``loads > 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from ._exitsafe import start_daemon
from .backends.base import SCORE, EmbedderModel, LoadedModel, Task
from .cache import TTLCache, distinct, spread
from .engine.executor import Executor, executor_for
from .engine.request import Lane, Request
from .engine_config import EngineConfig, no_limit
from .exceptions import InvalidInputError, ModelReleasedError
from .inputs import (
    check_batch_size,
    check_pairs,
    check_priority,
    check_texts,
    check_timeout,
    clean_text,
)
from .spec import ModelSpec
from .stats import Metrics, SpecStats

__all__ = ["ModelHandle", "SpecStats", "clean_text"]


class ModelHandle:
    """A shared loaded model. Obtain one from :meth:`ModelPool.get`; don't keep it across requests
    if you want :meth:`ModelPool.release` to free memory (adapters never keep it)."""

    def __init__(
        self, spec: ModelSpec, model: LoadedModel, stats: SpecStats, config: EngineConfig
    ) -> None:
        self.spec = spec
        self.config = config
        self._model: LoadedModel | None = model
        self._stats = stats
        self._pin_lock = threading.Lock()
        # Calls running on this handle (the pool pins around its calls too); a pool evicts a
        # model only when none runs, and after _try_retire() new calls get ModelReleasedError.
        self._in_flight = 0
        self._retiring = False
        if stats.metrics is None:
            stats.metrics = Metrics(config.metrics_window, config.max_batch_size)
        self._metrics = stats.metrics
        self._score_cache = TTLCache(config.score_cache_size, config.score_cache_ttl_s)
        self._query_cache = TTLCache(config.query_cache_size, config.query_cache_ttl_s)
        self._executor: Executor = executor_for(model, spec.label, config, self._metrics)
        # Unreferenced (pool collected, no clear()): stop the idle worker holding the model.
        self._executors = [self._executor]
        self._finalizer = weakref.finalize(self, _close_in_thread, self._executors)
        self._finalizer.atexit = False  # at exit the daemon threads just end, as before

    # -- properties ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._require_model().kind

    @property
    def device(self) -> str:
        return self._stats.device

    @property
    def dtype(self) -> str:
        return self._stats.dtype

    @property
    def released(self) -> bool:
        return self._model is None

    @property
    def model(self) -> LoadedModel:
        """The backend object (e.g. the underlying CrossEncoder). Read-only use: not scheduled."""
        return self._require_model()

    @property
    def dimension(self) -> int:
        model = self._require_model()
        if not isinstance(model, EmbedderModel):
            raise InvalidInputError(f"{self.spec.label} is not an embedder.")
        return model.dimension

    def _require_model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelReleasedError(
                f"{self.spec.label} was released. Ask the pool again (pool.get(spec)) to reload it."
            )
        return model

    def _require_kind(self, kind: str) -> None:
        if self.kind != kind:
            raise InvalidInputError(f"{self.spec.label} is not a {kind}; it cannot do that.")

    # -- execution ----------------------------------------------------------------------------

    def _request(
        self, task: Task, items: list[Any], batch_size: int, timeout: float | None, priority: Lane
    ) -> tuple[Request, list[int]]:
        """The one request of a call (checked before work), over its distinct items: repeats
        are computed once (:func:`.cache.distinct`); the slots spread the results back."""
        check_batch_size(batch_size)
        check_priority(priority)
        timeout = check_timeout(timeout)
        if timeout is None:
            timeout = self.config.request_timeout_s
        unique, slots = distinct(items)
        return Request(task, unique, batch_size, priority, no_limit(timeout)), slots

    @contextlib.contextmanager
    def _counted(self, n_items: int) -> Iterator[None]:
        """Pin the handle for one call and count it (an error, or a cancellation: also a sync
        caller's Ctrl-C or notebook "interrupt kernel", not a failed model call)."""
        self._pin_or_raise()
        start = time.perf_counter()
        try:
            yield
        except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
            self._metrics.bump("cancelled")
            raise
        except BaseException:
            self._stats.add_call(n_items, time.perf_counter() - start, error=True)
            raise
        finally:
            self._unpin()
        self._stats.add_call(n_items, time.perf_counter() - start)

    def _execute(
        self, task: Task, items: list[Any], batch_size: int, timeout: float | None, priority: Lane
    ) -> list[Any]:
        request, slots = self._request(task, items, batch_size, timeout, priority)
        with self._counted(len(items)):
            return spread(self._executor.run(request), slots)

    async def _aexecute(
        self, task: Task, items: list[Any], batch_size: int, timeout: float | None, priority: Lane
    ) -> list[Any]:
        request, slots = self._request(task, items, batch_size, timeout, priority)
        with self._counted(len(items)):
            return spread(await self._executor.arun(request), slots)

    def _warm_up(self, task: Task, items: list[Any]) -> None:
        """The pool's warm-up pass: through the engine and pinned like a call, but no caller's,
        so out of calls, items, busy time, caches and latency (the pool counts ``warmups``)."""
        request, _ = self._request(task, items, 32, None, "interactive")
        request.counted = False  # out of the engine's latency and queue-wait figures
        self._pin_or_raise()
        try:
            self._executor.run(request)
        finally:
            self._unpin()

    # -- in-flight calls (what a pool's eviction checks) --------------------------------------

    def _pin(self) -> bool:
        """Count one call in flight; False (nothing counted) once the pool retired this handle."""
        with self._pin_lock:
            if self._retiring or self._model is None:
                return False
            self._in_flight += 1
            return True

    def _pin_or_raise(self) -> None:
        if not self._pin():
            raise ModelReleasedError(
                f"{self.spec.label} was released. Ask the pool again (pool.get(spec)) to reload it."
            )

    def _unpin(self) -> None:
        with self._pin_lock:
            self._in_flight -= 1

    def _try_retire(self) -> bool:
        """Atomically: if no call is in flight, refuse every later one. True when retired.
        A backend call its caller stopped waiting for (a timeout, a cancellation) still runs
        in its thread: such a model is busy too, so an eviction leaves it for later instead of
        waiting for it (maybe on an event loop's thread)."""
        with self._pin_lock:
            if self._in_flight or self._executor.busy():
                return False
            self._retiring = True
            return True

    # -- reranking ----------------------------------------------------------------------------

    def _score_plan(
        self, pairs: Sequence[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[float | None], list[int], list[tuple[str, str]]]:
        """Checked pairs, cached scores, indices still to score, and those pairs."""
        checked = check_pairs(pairs)
        if checked:
            self._require_kind("reranker")
        scores, missing = self._score_cache.split(list(checked))
        if self._score_cache.enabled:
            self._stats.add(cache_hits=len(checked) - len(missing), cache_misses=len(missing))
        if checked and not missing:
            self._stats.add_call(len(checked), 0.0)  # answered from the cache
        elif len(missing) < len(checked):  # the cached part of a call counts as items too
            self._stats.add(items=len(checked) - len(missing))
        return checked, scores, missing, [checked[i] for i in missing]

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        *,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[float]:
        """Relevance score per (query, passage) pair, in input order."""
        checked, scores, missing, todo = self._score_plan(pairs)
        fresh = self._execute(SCORE, todo, batch_size, timeout, priority) if todo else []
        return self._score_cache.merge(list(checked), scores, missing, fresh)

    async def ascore_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        *,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[float]:
        """Async :meth:`score_pairs`: awaits the worker without blocking the event loop."""
        checked, scores, missing, todo = self._score_plan(pairs)
        fresh = await self._aexecute(SCORE, todo, batch_size, timeout, priority) if todo else []
        return self._score_cache.merge(list(checked), scores, missing, fresh)

    # -- embedding ----------------------------------------------------------------------------

    def _embed_task(self, texts: Sequence[str], batch_size: int, is_query: bool,
                    normalize: bool, prompt: str | None) -> tuple[list[str], Task]:  # fmt: skip
        checked = check_texts(texts, prompt)
        if checked:
            self._require_kind("embedder")
        check_batch_size(batch_size)
        prompt = prompt and clean_text(prompt)  # a prompt is tokenized with every text
        return checked, Task("embed", is_query=is_query, normalize=normalize, prompt=prompt)

    def _cached_query(self, texts: list[str], task: Task) -> list[list[float]] | None:
        if not (task.is_query and len(texts) == 1 and self._query_cache.enabled):
            return None
        value = self._query_cache.get((texts[0], task))
        hit = value is not TTLCache.MISSING
        self._stats.add(cache_hits=int(hit), cache_misses=int(not hit))
        if hit:
            self._stats.add_call(1, 0.0)
            return [list(value)]
        return None

    def _remember_query(self, texts: list[str], task: Task, vectors: list[list[float]]) -> None:
        if task.is_query and len(texts) == 1 and self._query_cache.enabled:
            self._query_cache.put((texts[0], task), tuple(vectors[0]))

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[list[float]]:
        """One vector per text. ``is_query`` selects the model's query prompt, if it has one;
        ``prompt`` (an instruction) replaces the model's own prompt."""
        items, task = self._embed_task(texts, batch_size, is_query, normalize, prompt)
        if not items:
            return []
        cached = self._cached_query(items, task)
        if cached is not None:
            return cached
        vectors = self._execute(task, items, batch_size, timeout, priority)
        self._remember_query(items, task, vectors)
        return vectors

    async def aembed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: Lane = "interactive",
    ) -> list[list[float]]:
        """Async :meth:`embed`: awaits the worker without blocking the event loop."""
        items, task = self._embed_task(texts, batch_size, is_query, normalize, prompt)
        if not items:
            return []
        cached = self._cached_query(items, task)
        if cached is not None:
            return cached
        vectors = await self._aexecute(task, items, batch_size, timeout, priority)
        self._remember_query(items, task, vectors)
        return vectors

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def token_budget(self) -> int | None:
        """Padded tokens per forward pass the scheduler allows now (None: not scheduled)."""
        return self._metrics.token_budget

    def _close(self) -> None:
        """Finish queued work, stop the worker, drop caches and weights. Idempotent."""
        self._finalizer.detach()
        self._executor.close()
        model, self._model = self._model, None
        self._score_cache.clear()
        self._query_cache.clear()
        if model is not None:
            model.close()

    def _after_fork(self) -> None:
        """In a forked child: new locks and a new worker (threads do not survive fork)."""
        self._pin_lock = threading.Lock()
        self._stats.renew_lock()  # its metrics' lock too
        self._in_flight = 0  # the parent's calls do not run in the child
        self._score_cache._lock = threading.Lock()
        self._query_cache._lock = threading.Lock()
        self._executor = self._executor.after_fork(self._metrics, self.config)
        self._executors[0] = self._executor

    def __repr__(self) -> str:
        state = "released" if self.released else "loaded"
        return f"<ModelHandle {self.spec.label} {state}>"


def _close_in_thread(executors: list[Executor]) -> None:
    """Close ``executors[0]`` in a thread of its own: a finalizer runs on the thread that
    dropped the last reference (maybe the worker itself), and closing joins the worker."""
    start_daemon(executors[0].close, name="rag-rerank-finalize")
