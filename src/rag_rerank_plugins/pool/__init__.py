"""The process-wide pool of loaded models: the one place where models are loaded and freed.

Adapters keep only a :class:`ModelSpec` and ask the pool for a :class:`ModelHandle` on each call,
so building an adapter per request costs microseconds, and ``release()`` really frees memory (no
adapter pins the weights).

Guarantees:

* **Once per spec.** Concurrent first calls for a cold spec wait on a per-spec lock (callers with
  a deadline and async callers on one shared wait, :mod:`.waits`); exactly one loads. Different
  specs load in parallel. A failed load caches nothing: the callers waiting on it get its error,
  and the next call retries.
* **Thread-safe calls.** Each scheduled model's forward passes run on its engine's worker (fast
  tokenizers raise "Already borrowed" when shared); async calls never load on the event loop.
* **Fork-aware** (:mod:`.process`). In a child after ``fork`` every lock is new; CUDA/MPS models
  of the parent are never used (the child loads its own); CPU models are kept and shared
  copy-on-write, which is why ``preload()`` before forking CPU workers (gunicorn ``--preload``)
  saves memory. The idle reaper thread is started again in the child.
* **Memory-managed** (:mod:`.budget`; optional,
  :class:`~rag_rerank_plugins.engine_config.PoolConfig`). With a per-device budget, loading a
  model evicts the least recently used models on its device that have no call in flight (before
  the load when the model's footprint is known from an earlier load, else right after it, never
  the model just loaded); with ``idle_unload_s`` a reaper thread releases models nobody called
  for that long. A call pins its handle from lookup to result, so a model is never evicted under
  a running forward and a request never fails because its model was evicted (it reloads, with the
  warm-up pass of ``preload``). Loads are serialised under a budget: each load must see what the
  previous ones took.
"""

from .core import ModelPool
from .process import get_pool

__all__ = ["ModelPool", "get_pool"]
