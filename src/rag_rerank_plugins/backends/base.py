"""The seam between the engine and the model libraries: what a loaded backend provides.

A backend is a loader ``(spec, provider) -> LoadedModel``. The pool owns loading, statistics and
lifetime; the executor owns scheduling, timeouts and error mapping; a backend only turns items
into results. Keeping that split is what lets one scheduler, one stats format and one release
path serve every library (sentence-transformers, FlagEmbedding, remote servers, fakes).

The protocol, in the order the engine uses it:

* ``thread_safe`` (class attribute): True when concurrent calls are safe (HTTP clients, fakes,
  the bi-encoder wrapper). Those models are called directly in the caller's thread; every other
  model is owned by one scheduler whose device worker is the only thread that runs its
  ``forward`` and ``finish``: that thread, not a lock, serialises the model's passes, and callers
  only enqueue and wait.
* Two phases, so the device never waits for the CPU (like infinity's pre/forward/post stages
  and TEI's tokenisation workers ahead of its batcher):

  - :meth:`LoadedModel.prepare` runs on the CPU off the device thread (tokenise, collate, pin
    memory) and returns a :class:`Prepared` batch. By default it is called from one prepare
    thread at a time per model, so a backend may use its tokenizer there without locking. A
    backend whose ``prepare`` is safe to run concurrently sets ``concurrent_prepare = True``;
    the engine then prepares with ``EngineConfig.prepare_workers`` threads (TEI's pool of
    tokenisation workers: on a GPU host, a small model is limited by tokenising, not the GPU;
    4 by default on CUDA hosts with 8 or more cores).
  - :meth:`LoadedModel.forward` runs on the device worker: host->device copies, the model, and
    *starting* the one device->host copy of the outputs; it returns a pending result.
  - :meth:`LoadedModel.finish` waits for that copy and returns one result per item. The worker
    launches the next pass before finishing the previous one, so on a GPU the copy-back of pass
    k overlaps the kernels of pass k+1.

  Backends that do not split (remote, fakes, BGE-M3) inherit defaults under which
  ``prepare`` only packs the items and ``forward`` calls :meth:`LoadedModel.run` in one go.
* ``parallel_forward`` and :meth:`LoadedModel.bind_worker_thread`: on the CPU, a backend whose
  passes may run concurrently gets several device workers, each with a share of the cores.
* :meth:`LoadedModel.is_oom` and :meth:`LoadedModel.free_cache`: how the engine recognises an
  out-of-memory failure and gives cached device memory back before it splits a batch.
* :meth:`LoadedModel.footprint_bytes` (optional): bytes the model holds on its device, which a
  pool with a memory budget uses to decide what to evict (default None: unknown, counted as 0).
* ``arun`` (optional, thread-safe models only): a native coroutine, so async callers need no
  thread (the remote backends' ``httpx.AsyncClient``).
* :func:`current_call` (optional): a directly called backend that calls other shared models (the
  bi-encoder) reads its caller's lane and deadline here and passes them on, so ``priority`` and
  ``timeout`` hold through it.

Backends never import the pool: what a backend may ask of its pool (the bi-encoder reuses the
shared embedder) is the :class:`ModelProvider` protocol below, so ``backends`` has no import
edge, type-only included, to ``pool``, ``handle`` or the scheduler.
"""

from __future__ import annotations

import contextlib
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "CallContext",
    "EmbedderModel",
    "Kind",
    "LoadedModel",
    "Loader",
    "ModelProvider",
    "Prepared",
    "RerankerModel",
    "Task",
    "call_context",
    "current_call",
    "is_out_of_memory",
]

Kind = Literal["reranker", "embedder"]


@dataclass(frozen=True)
class Task:
    """What a request asks of a model; requests with equal tasks may share forward passes.

    ``op`` is ``"score"`` (items are (query, passage) pairs) or ``"embed"`` (items are texts,
    with ``is_query``, ``normalize`` and an optional instruction ``prompt``).
    """

    op: Literal["score", "embed"]
    is_query: bool = False
    normalize: bool = False
    prompt: str | None = None


SCORE = Task("score")


@dataclass
class Prepared:
    """One micro-batch, ready for the device. ``payload`` is whatever the backend's forward needs
    (token tensors for torch backends, the raw items for one-shot backends)."""

    payload: Any
    size: int
    #: Real padded and unpadded token counts of the batch when the backend knows them (stats:
    #: avg_tokens_per_batch, padding_ratio), else None (the scheduler's estimates are used).
    padded_tokens: int | None = None
    real_tokens: int | None = None


@dataclass(frozen=True)
class CallContext:
    """The lane and deadline of the request a directly called backend is running."""

    priority: Literal["interactive", "bulk"] = "interactive"
    #: ``time.monotonic()`` by which the caller wants the result (None: no deadline).
    deadline: float | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline; at least 1 ms, so a callee
        fails with its own timeout error rather than an invalid one)."""
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())


_CALL: ContextVar[CallContext | None] = ContextVar("rag_rerank_call", default=None)


def current_call() -> CallContext:
    """The context of the call being run in this thread or task (defaults when none)."""
    return _CALL.get() or CallContext()


@contextlib.contextmanager
def call_context(context: CallContext) -> Iterator[None]:
    """Run the block as part of ``context`` (the engine's direct stage sets it)."""
    token = _CALL.set(context)
    try:
        yield
    finally:
        # A coroutine closed by the garbage collector resumes in another context, where the
        # token is foreign; the variable dies with its own context then.
        with contextlib.suppress(ValueError):
            _CALL.reset(token)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory failures, whatever the library raised them as."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        # CUDA: "CUDA out of memory"; MPS: "MPS backend out of memory"; CPU allocator: "can't
        # allocate memory" / "DefaultCPUAllocator: not enough memory".
        return any(
            marker in message
            for marker in ("out of memory", "can't allocate memory", "not enough memory")
        )
    return False


class LoadedModel(ABC):
    """A model in memory; see the module docstring for the protocol."""

    kind: ClassVar[Kind]
    #: True when concurrent calls are safe: the model is then called directly, unscheduled.
    thread_safe: ClassVar[bool] = False
    #: True when :meth:`prepare` may run in several threads at once (see the module docstring).
    #: Hugging Face fast tokenizers qualify once their truncation and padding settings are fixed:
    #: a call with unchanged settings only reads them, so warm the tokenizer up at load time.
    concurrent_prepare: bool = False
    #: True when :meth:`forward` and :meth:`finish` may run in several device workers at once.
    #: For a model on the CPU the engine then runs ``EngineConfig.cpu_workers`` workers, each
    #: with a share of the cores (:meth:`bind_worker_thread`): on a CPU, several single-threaded
    #: passes beat one pass spread over every core.
    parallel_forward: bool = False
    #: False when the runtime cannot run in a forked child (OpenVINO's stream executors hang
    #: there): the pool then leaves a CPU model of the parent unused in the child and reloads it,
    #: as it does GPU models. True for torch and onnxruntime models (shared copy-on-write).
    fork_safe: ClassVar[bool] = True
    #: False when calls run no native code that interpreter exit could cut short (an HTTP
    #: client's): exit then does not wait for them (:mod:`rag_rerank_plugins._exitsafe`).
    native: ClassVar[bool] = True
    #: Concrete device and dtype the model runs with (reported in stats and logs).
    device: str = "cpu"
    dtype: str = "float32"
    #: Which kernels run beyond the framework's defaults (e.g. "tiled attention, 38 packed
    #: oneDNN linear layers"); "" when nothing special. Reported in stats and logs.
    kernels: str = ""
    #: Longest input in tokens (batch shapes use it to cap estimates); None: unknown.
    max_tokens: int | None = None
    #: Padded tokens a CPU pass should hold for this model's kernels when the pool's
    #: ``EngineConfig.token_budget`` is not set; None: the engine's CPU default.
    cpu_token_budget: int | None = None

    @abstractmethod
    def run(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        """One result per item, in input order: the one-shot path (no separate phases)."""

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        """Async :meth:`run` for thread-safe models (default: in a worker thread). Override with
        a native coroutine where the library has one (HTTP clients)."""
        import asyncio

        return await asyncio.to_thread(self.run, task, items, batch_size)

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        """CPU work for one micro-batch (default: none; :meth:`forward` does everything)."""
        return Prepared(list(items), len(items))

    def forward(self, task: Task, batch: Prepared) -> Any:
        """Device work for a prepared batch; returns what :meth:`finish` turns into results."""
        return self.run(task, batch.payload, batch.size)

    def finish(self, task: Task, pending: Any) -> list[Any]:
        """Wait for the device->host copy started by :meth:`forward`; one result per item."""
        return list(pending)

    def is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the pass ran out of memory (the engine then splits it)."""
        return is_out_of_memory(exc)

    def bind_worker_thread(self, threads: int) -> None:
        """Called on a CPU device worker thread (see ``parallel_forward``) before a pass whose
        thread count differs from its last one: run this thread's passes with ``threads``
        compute threads (a lone pass gets every core, passes that run together share them). The
        default does nothing; torch backends set the thread's own intra-op thread count."""
        return None

    def free_cache(self) -> None:
        """Give cached, unreferenced device memory back (after an OOM, before a retry)."""
        torch = sys.modules.get("torch")
        if torch is None:
            return
        if self.device.startswith("cuda") and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        elif self.device == "mps":
            torch.mps.empty_cache()

    def footprint_bytes(self) -> int | None:
        """Bytes of weights this model holds on :attr:`device` (parameters and buffers of its
        torch modules, the file size of an ONNX graph); None when unknown. On CUDA the pool
        prefers the allocator's growth during the load when it can measure it alone."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, default is "nothing to free"
        """Drop references to weights so the pool can free memory. Called once, on release."""


class RerankerModel(LoadedModel):
    """Scores (query, passage) pairs; higher means more relevant."""

    kind: ClassVar[Kind] = "reranker"

    @abstractmethod
    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        """One float per pair, in input order."""

    def run(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        return list(self.score_pairs(items, batch_size))

    def window_source(self) -> tuple[Any, int] | None:
        """``(tokenizer, max tokens of one query+passage input)`` for long-document windows.

        Optional; the default (None) means this backend cannot be windowed. The tokenizer is the
        model's own Hugging Face tokenizer: :mod:`rag_rerank_plugins.windows` uses a private copy,
        never this object, because the model's prepare thread tokenizes with it.

        A backend that cuts the query shorter than the pair (FlagEmbedding's
        ``query_max_length``) also defines ``window_query_limit() -> int | None``, the most
        tokens of the bare query that reach the model; the windower then cuts the query there.
        """
        return None


class EmbedderModel(LoadedModel):
    """Turns texts into vectors; queries and documents may be encoded differently."""

    kind: ClassVar[Kind] = "embedder"

    @property
    @abstractmethod
    def dimension(self) -> int:
        """Length of every vector this model returns."""

    @abstractmethod
    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        """One vector per text, in input order; unit length when ``normalize``. ``prompt``
        replaces the model's own query/document prompt (instruction-tuned embedders)."""

    def run(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        # ``prompt`` only when set: embedders written before it existed keep working.
        extra = {} if task.prompt is None else {"prompt": task.prompt}
        return list(
            self.embed(
                items,
                batch_size=batch_size,
                is_query=task.is_query,
                normalize=task.normalize,
                **extra,
            )
        )


class ModelProvider(Protocol):
    """What a loader may ask of the pool that loads it: other shared models, by spec."""

    def embed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        timeout: float | None = None,
        priority: Literal["interactive", "bulk"] = "interactive",
    ) -> list[list[float]]: ...

    async def aembed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        batch_size: int = 32,
        *,
        is_query: bool = False,
        normalize: bool = False,
        timeout: float | None = None,
        priority: Literal["interactive", "bulk"] = "interactive",
    ) -> list[list[float]]:
        """:meth:`embed` for coroutines: cancelling the awaiting task withdraws the request."""
        ...

    def model_info(self, spec: ModelSpec) -> tuple[str, str]:
        """Load ``spec`` if needed and return its concrete ``(device, dtype)``."""
        ...


#: A backend: builds a loaded model for a resolved spec; may use other shared models.
Loader = Callable[["ModelSpec", ModelProvider], LoadedModel]
