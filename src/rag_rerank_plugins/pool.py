"""The process-wide pool of loaded models: the one place where models are loaded and freed.

Adapters keep only a :class:`ModelSpec` and ask the pool for a :class:`ModelHandle` on each call,
so building an adapter per request costs microseconds, and ``release()`` really frees memory (no
adapter pins the weights).

Guarantees:

* **Once per spec.** Concurrent first calls for a cold spec wait on a per-spec lock; exactly one
  loads. Different specs load in parallel. A failed load caches nothing; the next call retries.
* **Thread-safe calls.** Each handle serialises forward passes of models that are not thread-safe
  (fast tokenizers raise "Already borrowed" when shared), so concurrent callers get exactly the
  results of sequential calls.
* **Fork-aware.** In a child after ``fork`` every lock is new; CUDA/MPS models of the parent are
  never used (the child loads its own); CPU models are kept and shared copy-on-write, which is why
  ``preload()`` before forking CPU workers (gunicorn ``--preload``) saves memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ._memory import free_memory
from .backends import EmbedderModel, LoadedModel, backend_info, get_loader
from .exceptions import (
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    ModelReleasedError,
    RagRerankError,
)
from .policy import configure_torch_threads, resolve_spec
from .spec import ModelSpec

__all__ = ["ModelHandle", "ModelPool", "SpecStats", "get_pool"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SpecStats:
    """Counters for one spec. They survive ``release()`` so reloads are visible as ``loads > 1``."""

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
    busy_seconds: float = 0.0
    last_used: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_strings(texts: Sequence[Any], what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"{what} #{i} is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )


class ModelHandle:
    """A loaded model plus the lock and counters that make it safe to share.

    Obtain one from :meth:`ModelPool.get`; do not keep it across requests if you want
    :meth:`ModelPool.release` to free memory (adapters never do).
    """

    def __init__(self, spec: ModelSpec, model: LoadedModel, stats: SpecStats) -> None:
        self.spec = spec
        self._model: LoadedModel | None = model
        self._stats = stats
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # Models that declare themselves thread-safe (fakes, remote clients) skip the call lock.
        self._serialise = not getattr(model, "thread_safe", False)

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
        """The backend object (e.g. the underlying CrossEncoder). Not locked: read-only use."""
        return self._require_model()

    def _require_model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise ModelReleasedError(
                f"{self.spec.label} was released. Ask the pool again (pool.get(spec)) to reload it."
            )
        return model

    def _run(self, n_items: int, method: str, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            if self._serialise:
                with self._lock:
                    model = self._require_model()
                    result = getattr(model, method)(*args, **kwargs)
            else:
                result = getattr(self._require_model(), method)(*args, **kwargs)
        except RagRerankError:
            self._count(n_items, start, error=True)
            raise
        except Exception as exc:
            self._count(n_items, start, error=True)
            raise InferenceError(f"{self.spec.label} failed: {type(exc).__name__}: {exc}") from exc
        self._count(n_items, start)
        return result

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

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
        """Relevance score per (query, passage) pair, in input order."""
        pairs = [tuple(p) for p in pairs]
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise InvalidInputError(f"pair #{i} has {len(pair)} items; expected (query, text).")
            _require_strings(pair, f"pair #{i} item")
        if not pairs:
            return []
        if batch_size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {batch_size}.")
        if self.kind != "reranker":
            raise InvalidInputError(f"{self.spec.label} is an embedder; it cannot score pairs.")
        scores: list[float] = self._run(len(pairs), "score_pairs", pairs, batch_size=batch_size)
        return scores

    def rerank_scores(self, query: str, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        """Score each text against one query."""
        _require_strings([query], "query")
        return self.score_pairs([(query, t) for t in texts], batch_size=batch_size)

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
    ) -> list[list[float]]:
        """One vector per text. ``is_query`` selects the model's query prompt, if it has one."""
        texts = list(texts)
        _require_strings(texts, "text")
        if not texts:
            return []
        if batch_size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {batch_size}.")
        if self.kind != "embedder":
            raise InvalidInputError(f"{self.spec.label} is a reranker; it cannot embed texts.")
        vectors: list[list[float]] = self._run(
            len(texts),
            "embed",
            texts,
            batch_size=batch_size,
            is_query=is_query,
            normalize=normalize,
        )
        return vectors

    @property
    def dimension(self) -> int:
        model = self._require_model()
        if not isinstance(model, EmbedderModel):
            raise InvalidInputError(f"{self.spec.label} is not an embedder.")
        return model.dimension

    def _close(self) -> None:
        """Wait for the in-flight call, then drop the weights. Idempotent."""
        with self._lock:
            model, self._model = self._model, None
        if model is not None:
            model.close()
            del model

    def __repr__(self) -> str:
        state = "released" if self.released else "loaded"
        return f"<ModelHandle {self.spec.label} {state}>"


class _Slot:
    """Per-spec load lock plus the handle once loaded."""

    __slots__ = ("handle", "lock", "retired")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handle: ModelHandle | None = None
        self.retired = False


_POOLS: weakref.WeakSet[ModelPool] = weakref.WeakSet()


class ModelPool:
    """Thread-safe, fork-aware registry of loaded models keyed by resolved :class:`ModelSpec`.

    Most applications use the process-wide :func:`get_pool`; separate pools are useful in tests.
    """

    def __init__(self, *, num_threads: int | None = None) -> None:
        self._num_threads = num_threads
        self._init_state()
        _POOLS.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[ModelSpec, _Slot] = {}
        self._keys: dict[ModelSpec, ModelSpec] = {}
        self._stats: dict[ModelSpec, SpecStats] = {}
        self._reasons: dict[ModelSpec, str] = {}
        self._fork_orphans: list[ModelHandle] = []

    # -- keys ---------------------------------------------------------------------------------

    def key(self, spec: ModelSpec) -> ModelSpec:
        """The resolved spec the pool stores ``spec`` under (device, dtype, path made concrete)."""
        key = self._keys.get(spec)
        if key is None:
            if not isinstance(spec, ModelSpec):
                raise InvalidInputError(f"expected a ModelSpec, got {type(spec).__name__}")
            backend_info(spec.backend)  # unknown backend -> clear error before any work
            key, decision = resolve_spec(spec)
            self._reasons.setdefault(key, decision.reason)
            self._keys[spec] = key
        return key

    # -- loading ------------------------------------------------------------------------------

    def get(self, spec: ModelSpec) -> ModelHandle:
        """The shared handle for ``spec``, loading it on first use (exactly once)."""
        key = self.key(spec)
        while True:
            slot = self._slots.get(key)
            if slot is not None and slot.handle is not None:
                return slot.handle
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
            with slot.lock:
                if slot.retired:
                    continue  # released while we waited: start again with a fresh slot
                if slot.handle is None:
                    slot.handle = self._load(key)
                return slot.handle

    def _stats_for(self, key: ModelSpec) -> SpecStats:
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                info = backend_info(key.backend)
                stats = self._stats[key] = SpecStats(
                    spec=key.label,
                    backend=key.backend,
                    model=key.model,
                    kind=info.kind,
                    device=key.device,
                    dtype=key.dtype,
                )
            return stats

    def _load(self, key: ModelSpec) -> ModelHandle:
        stats = self._stats_for(key)
        configure_torch_threads(self._num_threads)
        loader = get_loader(key.backend)
        start = time.perf_counter()
        try:
            model = loader(key, self)
        except RagRerankError:
            stats.load_failures += 1
            raise
        except Exception as exc:
            stats.load_failures += 1
            raise ModelLoadError(key.model, key.backend, exc) from exc
        elapsed = time.perf_counter() - start
        stats.loads += 1
        stats.load_seconds += elapsed
        stats.loaded = True
        stats.device = model.device
        stats.dtype = model.dtype
        stats.dtype_reason = self._reasons.get(key, "")
        logger.info(
            "rag-rerank: loaded %s in %.2fs on %s as %s (%s)",
            key.model,
            elapsed,
            model.device,
            model.dtype,
            stats.dtype_reason,
        )
        return ModelHandle(key, model, stats)

    def preload(self, *specs: ModelSpec, warmup: bool = True) -> list[ModelHandle]:
        """Load ``specs`` now (e.g. in a FastAPI lifespan) and optionally run one tiny forward pass.

        Warm-up moves first-call costs (kernel choice, allocator growth) out of the first request.
        """
        handles = [self.get(spec) for spec in specs]
        if warmup:
            for handle in handles:
                if handle.kind == "reranker":
                    handle.score_pairs([("warm-up query", "warm-up passage")])
                else:
                    handle.embed(["warm-up text"])
        return handles

    # -- releasing ----------------------------------------------------------------------------

    def release(self, spec: ModelSpec) -> bool:
        """Unload ``spec`` and free its memory. Returns False when it was not loaded.

        In-flight calls on the handle finish first; later calls load the model again.
        """
        key = self.key(spec)
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            return False
        with slot.lock:
            slot.retired = True
            handle, slot.handle = slot.handle, None
        if handle is None:
            return False
        device = handle.device
        handle._close()
        stats = self._stats.get(key)
        if stats is not None:
            stats.loaded = False
            stats.releases += 1
        del handle
        free_memory(device)
        logger.info("rag-rerank: released %s", key.label)
        return True

    def clear(self) -> int:
        """Release every model. Returns how many were released."""
        with self._lock:
            keys = list(self._slots)
        return sum(self.release(key) for key in keys)

    # -- introspection ------------------------------------------------------------------------

    def is_loaded(self, spec: ModelSpec) -> bool:
        slot = self._slots.get(self.key(spec))
        return slot is not None and slot.handle is not None

    def loaded_specs(self) -> list[ModelSpec]:
        return [key for key, slot in list(self._slots.items()) if slot.handle is not None]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per spec label: loads, load_seconds, calls, items, errors, device, dtype, ..."""
        with self._lock:
            return {s.spec: s.as_dict() for s in self._stats.values()}

    def spec_stats(self, spec: ModelSpec) -> dict[str, Any]:
        """Counters for one spec (zeros if it was never loaded)."""
        key = self.key(spec)
        stats = self._stats.get(key) or self._stats_for(key)
        return stats.as_dict()

    def reset_stats(self) -> None:
        """Zero the call counters; load counters and state are kept."""
        with self._lock:
            for stats in self._stats.values():
                stats.calls = stats.items = stats.errors = 0
                stats.busy_seconds = 0.0

    # -- calls with one retry when a release races the call -----------------------------------

    def _call(self, spec: ModelSpec, fn: Any) -> Any:
        for attempt in (1, 2):
            handle = self.get(spec)
            try:
                return fn(handle)
            except ModelReleasedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def score_pairs(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> list[float]:
        result: list[float] = self._call(spec, lambda h: h.score_pairs(pairs, batch_size))
        return result

    def embed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
    ) -> list[list[float]]:
        result: list[list[float]] = self._call(
            spec, lambda h: h.embed(texts, batch_size, is_query=is_query, normalize=normalize)
        )
        return result

    async def ascore_pairs(
        self, spec: ModelSpec, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> list[float]:
        """Like :meth:`score_pairs`, in a worker thread so the event loop keeps running."""
        return await _in_thread(self.score_pairs, spec, pairs, batch_size)

    async def aembed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
    ) -> list[list[float]]:
        return await _in_thread(
            functools.partial(self.embed, is_query=is_query, normalize=normalize),
            spec,
            texts,
            batch_size,
        )

    # -- fork ---------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """Runs in a forked child: new locks; drop (never touch) the parent's GPU models."""
        old_slots = self._slots
        old_stats = self._stats
        orphans = self._fork_orphans
        self._init_state()
        self._fork_orphans = orphans
        for key, slot in old_slots.items():
            handle = slot.handle
            if handle is None:
                continue
            if handle.device == "cpu":
                # Same weights, shared copy-on-write with the parent; only the locks are new.
                handle._lock = threading.Lock()
                handle._stats_lock = threading.Lock()
                fresh = _Slot()
                fresh.handle = handle
                self._slots[key] = fresh
            else:
                # A CUDA context does not survive fork. Keep the object alive but unused: freeing
                # its tensors here would call into the parent's CUDA context.
                self._fork_orphans.append(handle)
                old_stats[key].loaded = False
        self._stats = old_stats


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_default_pool: ModelPool | None = None
_default_lock = threading.Lock()


def get_pool() -> ModelPool:
    """The process-wide default pool that every adapter uses unless given another."""
    global _default_pool
    pool = _default_pool
    if pool is None:
        with _default_lock:
            if _default_pool is None:
                _default_pool = ModelPool()
            pool = _default_pool
    return pool
