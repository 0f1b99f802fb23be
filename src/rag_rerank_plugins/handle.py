"""`ModelHandle`: one loaded model plus what makes it safe and cheap to share.

A handle validates input, answers from its caches, and hands the rest to its scheduler (see
:mod:`rag_rerank_plugins.scheduler`), whose single worker thread is the only thread that touches
the model. Models that declare ``thread_safe = True`` (fakes, HTTP clients, the bi-encoder
wrapper) are called directly instead. Counters live in :class:`SpecStats`, which the pool keeps
across releases so reloads show up as ``loads > 1``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any

from .backends import EmbedderModel, LoadedModel
from .cache import TTLCache
from .engine_config import EngineConfig
from .exceptions import (
    InferenceError,
    InvalidInputError,
    ModelReleasedError,
    RagRerankError,
    RequestTimeoutError,
)
from .scheduler import Metrics, Scheduler, wait_result
from .spec import ModelSpec

__all__ = ["ModelHandle", "SpecStats"]


@dataclass
class SpecStats:
    """Counters for one spec, as reported by ``ModelPool.stats()``."""

    spec: str
    backend: str
    model: str
    kind: str
    device: str
    dtype: str
    dtype_reason: str = ""
    loaded: bool = False
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    releases: int = 0
    calls: int = 0
    items: int = 0  # pairs scored (rerankers) or texts embedded (embedders)
    errors: int = 0
    passthrough: int = 0  # adapter calls answered in retrieval order (on_error)
    cache_hits: int = 0
    cache_misses: int = 0
    busy_seconds: float = 0.0
    last_used: float | None = None
    metrics: Metrics | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        if self.metrics is not None:
            data.update(self.metrics.snapshot())
        return data


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
        self._stats_lock = threading.Lock()
        if stats.metrics is None:
            stats.metrics = Metrics(config.metrics_window, config.max_batch_size)
        self._metrics = stats.metrics
        self._score_cache = TTLCache(config.score_cache_size, config.score_cache_ttl_s)
        self._query_cache = TTLCache(config.query_cache_size, config.query_cache_ttl_s)
        self._scheduler = (
            self._new_scheduler() if not getattr(model, "thread_safe", False) else None
        )

    def _new_scheduler(self) -> Scheduler:
        model = self._require_model()
        return Scheduler(
            model,
            self.config,
            self._metrics,
            device=model.device,
            max_tokens=getattr(model, "max_tokens", None) or self.spec.max_length,
            name=self.spec.label,
        )

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

    def _submit(
        self, method: str, items: list[Any], batch_size: int, kwargs: dict[str, Any]
    ) -> Future[list[Any]] | None:
        """A scheduler future, or None when the model is called directly (thread-safe models)."""
        if batch_size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {batch_size}.")
        if self._scheduler is None:
            return None
        return self._scheduler.submit(method, items, {**kwargs}, batch_size=batch_size)

    def _direct(
        self, method: str, items: list[Any], batch_size: int, kwargs: dict[str, Any]
    ) -> list[Any]:
        return list(getattr(self._require_model(), method)(items, batch_size=batch_size, **kwargs))

    def _execute(
        self,
        method: str,
        items: list[Any],
        batch_size: int,
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> list[Any]:
        start = time.perf_counter()
        try:
            future = self._submit(method, items, batch_size, kwargs)
            if future is None:
                result = self._direct(method, items, batch_size, kwargs)
            else:
                result = wait_result(future, self._timeout(timeout), self.spec.label)
        except BaseException as exc:
            error = self._count_error(exc, len(items), start)
            if error is exc:
                raise
            raise error from exc
        self._count(len(items), start)
        return result

    async def _aexecute(
        self,
        method: str,
        items: list[Any],
        batch_size: int,
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> list[Any]:
        import asyncio  # lazily: keeps `import rag_rerank_plugins` cheap for sync-only apps

        start = time.perf_counter()
        timeout = self._timeout(timeout)
        try:
            future = self._submit(method, items, batch_size, kwargs)
            native = getattr(self._require_model(), f"a{method}", None)
            if future is None and native is not None:  # e.g. remote clients: no thread needed
                call = native(items, batch_size=batch_size, **kwargs)
            elif future is None:
                call = asyncio.to_thread(self._direct, method, items, batch_size, kwargs)
            else:
                call = asyncio.wrap_future(future)  # cancelling the task withdraws the request
            try:
                result = await asyncio.wait_for(call, timeout)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(
                    f"{self.spec.label}: no result within {timeout} s. Raise the timeout, "
                    "reduce load, or add replicas."
                ) from None
        except asyncio.CancelledError:
            self._metrics.bump("cancelled")
            raise
        except BaseException as exc:
            error = self._count_error(exc, len(items), start)
            if error is exc:
                raise
            raise error from exc
        self._count(len(items), start)
        return result

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.config.request_timeout_s

    def _count(self, n_items: int, start: float, error: bool = False) -> None:
        now = time.perf_counter()
        with self._stats_lock:
            s = self._stats
            s.calls += 1
            s.items += n_items
            s.busy_seconds += now - start
            s.last_used = time.time()
            if error:
                s.errors += 1

    def _count_error(self, exc: BaseException, n_items: int, start: float) -> BaseException:
        self._count(n_items, start, error=True)
        if isinstance(exc, (RagRerankError, KeyboardInterrupt, SystemExit)):
            return exc
        return InferenceError(f"{self.spec.label} failed: {type(exc).__name__}: {exc}")

    def _cache_counts(self, hits: int, misses: int) -> None:
        with self._stats_lock:
            self._stats.cache_hits += hits
            self._stats.cache_misses += misses

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
    ) -> list[float]:
        """Relevance score per (query, passage) pair, in input order."""
        checked, scores, missing, todo = self._score_plan(pairs)
        fresh = self._execute("score_pairs", todo, batch_size, {}, timeout) if todo else []
        return self._merge_scores(checked, scores, missing, fresh)

    async def ascore_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        *,
        timeout: float | None = None,
    ) -> list[float]:
        """Async :meth:`score_pairs`: awaits the worker without blocking the event loop."""
        checked, scores, missing, todo = self._score_plan(pairs)
        fresh = await self._aexecute("score_pairs", todo, batch_size, {}, timeout) if todo else []
        return self._merge_scores(checked, scores, missing, fresh)

    # -- embedding ----------------------------------------------------------------------------

    def _embed_args(
        self,
        texts: Sequence[str],
        batch_size: int,
        is_query: bool,
        normalize: bool,
        prompt: str | None = None,
    ) -> tuple[list[str], dict[str, Any]]:
        texts = _require_strings(list(texts), "text")
        if texts:
            self._require_kind("embedder")
        if batch_size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {batch_size}.")
        kwargs: dict[str, Any] = {"is_query": is_query, "normalize": normalize}
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidInputError(
                    f"prompt must be a str or None, got {type(prompt).__name__}."
                )
            # Only when given, so backends written before `prompt` existed keep working. Being in
            # kwargs also keeps requests with different prompts out of one forward pass.
            kwargs["prompt"] = prompt
        return texts, kwargs

    def _cached_query(self, texts: list[str], kwargs: dict[str, Any]) -> list[list[float]] | None:
        if not (kwargs["is_query"] and len(texts) == 1 and self._query_cache.enabled):
            return None
        value = self._query_cache.get((texts[0], kwargs["normalize"], kwargs.get("prompt")))
        hit = value is not TTLCache.MISSING
        self._cache_counts(int(hit), int(not hit))
        if hit:
            self._count(1, time.perf_counter())
            return [list(value)]
        return None

    def _remember_query(
        self, texts: list[str], kwargs: dict[str, Any], vectors: list[list[float]]
    ) -> None:
        if kwargs["is_query"] and len(texts) == 1 and self._query_cache.enabled:
            key = (texts[0], kwargs["normalize"], kwargs.get("prompt"))
            self._query_cache.put(key, tuple(vectors[0]))

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        timeout: float | None = None,
        prompt: str | None = None,
    ) -> list[list[float]]:
        """One vector per text. ``is_query`` selects the model's query prompt, if it has one;
        ``prompt`` (for this call only) replaces that prompt."""
        items, kwargs = self._embed_args(texts, batch_size, is_query, normalize, prompt)
        if not items:
            return []
        cached = self._cached_query(items, kwargs)
        if cached is not None:
            return cached
        vectors = self._execute("embed", items, batch_size, kwargs, timeout)
        self._remember_query(items, kwargs, vectors)
        return vectors

    async def aembed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        timeout: float | None = None,
        prompt: str | None = None,
    ) -> list[list[float]]:
        items, kwargs = self._embed_args(texts, batch_size, is_query, normalize, prompt)
        if not items:
            return []
        cached = self._cached_query(items, kwargs)
        if cached is not None:
            return cached
        vectors = await self._aexecute("embed", items, batch_size, kwargs, timeout)
        self._remember_query(items, kwargs, vectors)
        return vectors

    # -- lifecycle ----------------------------------------------------------------------------

    def _close(self) -> None:
        """Finish queued work, stop the worker, drop caches and weights. Idempotent."""
        if self._scheduler is not None:
            self._scheduler.close()
        model, self._model = self._model, None
        self._score_cache.clear()
        self._query_cache.clear()
        if model is not None:
            model.close()

    def _after_fork(self) -> None:
        """In a forked child: new locks and a new worker (threads do not survive fork)."""
        self._stats_lock = threading.Lock()
        self._metrics._lock = threading.Lock()
        self._score_cache._lock = threading.Lock()
        self._query_cache._lock = threading.Lock()
        if self._scheduler is not None:
            self._scheduler = self._new_scheduler()

    def __repr__(self) -> str:
        state = "released" if self.released else "loaded"
        return f"<ModelHandle {self.spec.label} {state}>"
