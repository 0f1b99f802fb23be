"""`ModelHandle`: one loaded model plus what makes it safe and cheap to share.

A handle validates input (before any model work), answers from its caches, counts, builds the one
:class:`~rag_rerank_plugins.engine.request.Request` of each call, and hands it to its executor
(:mod:`rag_rerank_plugins.engine.executor`): a scheduler whose device worker is the only thread
that runs the model, or the direct stage for models that declare ``thread_safe``.
Counters live in :class:`~rag_rerank_plugins.stats.SpecStats`, which the pool keeps across
releases so reloads show up as ``loads > 1``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from .backends.base import SCORE, EmbedderModel, LoadedModel, Task
from .cache import TTLCache
from .engine.executor import Executor, executor_for
from .engine.request import LANES, Lane, Request
from .engine_config import EngineConfig
from .exceptions import InvalidInputError, ModelReleasedError
from .spec import ModelSpec
from .stats import Metrics, SpecStats

__all__ = ["ModelHandle", "SpecStats"]


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (e.g. ``"\\ud800"``, not encodable as UTF-8) replaced by
    U+FFFD. Fast tokenizers raise on them, which would fail every request sharing the batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _require_strings(texts: Sequence[Any], what: str) -> list[str]:
    """``texts`` checked to be str and cleaned with :func:`clean_text`."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"{what} #{i} is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )
    return [clean_text(text) for text in texts]


def _check_pairs(pairs: Sequence[Any]) -> list[tuple[str, str]]:
    checked = []
    for i, pair in enumerate(pairs):
        pair = tuple(pair)
        if len(pair) != 2:
            raise InvalidInputError(f"pair #{i} has {len(pair)} items; expected (query, text).")
        query, text = _require_strings(pair, f"pair #{i} item")
        checked.append((query, text))
    return checked


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
        self,
        task: Task,
        items: list[Any],
        batch_size: int,
        timeout: float | None,
        priority: Lane,
    ) -> Request:
        """The one request object that travels to the backend and back (checked here, before
        any model work)."""
        self._check_batch_size(batch_size)
        self._check_priority(priority)
        if timeout is None:
            timeout = self.config.request_timeout_s
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidInputError(
                f"timeout must be a positive number of seconds, got {timeout!r}."
            )
        return Request(task, items, batch_size, priority, timeout)

    def _execute(
        self,
        task: Task,
        items: list[Any],
        batch_size: int,
        timeout: float | None,
        priority: Lane = "interactive",
    ) -> list[Any]:
        request = self._request(task, items, batch_size, timeout, priority)
        self._pin_or_raise()
        start = time.perf_counter()
        try:
            result = self._executor.run(request)
        except BaseException:
            self._count(len(items), start, error=True)
            raise
        finally:
            self._unpin()
        self._count(len(items), start)
        return result

    async def _aexecute(
        self,
        task: Task,
        items: list[Any],
        batch_size: int,
        timeout: float | None,
        priority: Lane = "interactive",
    ) -> list[Any]:
        import asyncio

        request = self._request(task, items, batch_size, timeout, priority)
        self._pin_or_raise()
        start = time.perf_counter()
        try:
            result = await self._executor.arun(request)
        except asyncio.CancelledError:
            self._metrics.bump("cancelled")
            raise
        except BaseException:
            self._count(len(items), start, error=True)
            raise
        finally:
            self._unpin()
        self._count(len(items), start)
        return result

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
        """Atomically: if no call is in flight, refuse every later one. True when retired."""
        with self._pin_lock:
            if self._in_flight:
                return False
            self._retiring = True
            return True

    @staticmethod
    def _check_priority(priority: str) -> None:
        if priority not in LANES:
            raise InvalidInputError(
                f"priority must be 'interactive' or 'bulk', got {priority!r}: interactive for "
                "query-time calls, bulk for corpus (re-)embedding."
            )

    @staticmethod
    def _check_batch_size(batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")

    def _count(self, n_items: int, start: float, error: bool = False) -> None:
        self._stats.add(
            calls=1, items=n_items, busy_seconds=time.perf_counter() - start, errors=int(error)
        )
        self._stats.update(last_used=time.time())

    def _cache_counts(self, hits: int, misses: int) -> None:
        self._stats.add(cache_hits=hits, cache_misses=misses)

    # -- reranking ----------------------------------------------------------------------------

    def _split_cached_scores(
        self, pairs: list[tuple[str, str]]
    ) -> tuple[list[float | None], list[int]]:
        cache = self._score_cache
        scores: list[float | None] = [None] * len(pairs)
        if not cache.enabled:
            return scores, list(range(len(pairs)))
        missing = []
        for i, pair in enumerate(pairs):
            value = cache.get(pair)
            if value is TTLCache.MISSING:
                missing.append(i)
            else:
                scores[i] = value
        self._cache_counts(len(pairs) - len(missing), len(missing))
        return scores, missing

    def _merge_scores(
        self,
        pairs: list[tuple[str, str]],
        scores: list[float | None],
        missing: list[int],
        fresh: list[float],
    ) -> list[float]:
        for i, value in zip(missing, fresh, strict=True):
            scores[i] = float(value)
            if self._score_cache.enabled:
                self._score_cache.put(pairs[i], scores[i])
        return [float(s) for s in scores]  # type: ignore[arg-type]

    def _score_plan(
        self, pairs: Sequence[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[float | None], list[int], list[tuple[str, str]]]:
        """Checked pairs, cached scores, indices still to score, and those pairs."""
        checked = _check_pairs(pairs)
        if checked:
            self._require_kind("reranker")
        scores, missing = self._split_cached_scores(checked)
        if checked and not missing:
            self._count(len(checked), time.perf_counter())  # answered from the cache
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
        return self._merge_scores(checked, scores, missing, fresh)

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
        return self._merge_scores(checked, scores, missing, fresh)

    # -- embedding ----------------------------------------------------------------------------

    def _embed_task(
        self,
        texts: Sequence[str],
        batch_size: int,
        is_query: bool,
        normalize: bool,
        prompt: str | None,
    ) -> tuple[list[str], Task]:
        if isinstance(texts, str):  # list("hello") would embed five one-letter texts
            raise InvalidInputError(
                f"texts must be a list of str, got a single str {texts[:40]!r}; "
                "pass [text] to embed one text."
            )
        texts = _require_strings(list(texts), "text")
        if texts:
            self._require_kind("embedder")
        self._check_batch_size(batch_size)
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a str or None, got {type(prompt).__name__}.")
        return texts, Task("embed", is_query=is_query, normalize=normalize, prompt=prompt)

    def _cached_query(self, texts: list[str], task: Task) -> list[list[float]] | None:
        if not (task.is_query and len(texts) == 1 and self._query_cache.enabled):
            return None
        value = self._query_cache.get((texts[0], task))
        hit = value is not TTLCache.MISSING
        self._cache_counts(int(hit), int(not hit))
        if hit:
            self._count(1, time.perf_counter())
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
        self._executor.close()
        model, self._model = self._model, None
        self._score_cache.clear()
        self._query_cache.clear()
        if model is not None:
            model.close()

    def _after_fork(self) -> None:
        """In a forked child: new locks and a new worker (threads do not survive fork)."""
        self._pin_lock = threading.Lock()
        self._stats.renew_lock()
        self._in_flight = 0  # the parent's calls do not run in the child
        self._metrics._lock = threading.Lock()
        self._score_cache._lock = threading.Lock()
        self._query_cache._lock = threading.Lock()
        self._executor = self._executor.after_fork(self._metrics, self.config)

    def __repr__(self) -> str:
        state = "released" if self.released else "loaded"
        return f"<ModelHandle {self.spec.label} {state}>"
