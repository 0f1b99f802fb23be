"""What every endpoint shares: config, pool, served models, admission, counters, readiness.

:class:`ServerState` is ``app.state.server``; handlers receive it as their ``state`` argument.
Its model calls raise the pool's own exceptions, which the one exception handler
(:mod:`.errors`) turns into status codes; errors the endpoints decide on are :class:`ApiError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..pool import ModelPool
from ..tracing import model_span
from .config import ServedModel, ServerConfig
from .errors import ApiError
from .limits import Admission
from .metrics import RequestMetrics
from .tokens import TextTokens, text_tokens
from .wire import Lane

__all__ = ["ServerState"]

logger = logging.getLogger(__name__)


class ServerState:
    """Config, pool, served models, admission, counters and readiness of one app."""

    def __init__(self, config: ServerConfig, pool: ModelPool) -> None:
        self.config = config
        self.pool = pool
        self.served: list[ServedModel] = config.served_models()
        self.admission = Admission(config.max_concurrency, config.max_pending, config.retry_after)
        self.metrics = RequestMetrics()
        #: When this server started (Unix seconds): OpenAI's ``created`` of the served models.
        self.created = int(time.time())
        #: ``"METHOD /path"`` of every mounted endpoint (``GET /`` lists them); set by the app.
        self.endpoints: list[str] = []
        self.status = "starting"  # starting -> loading -> ok | failed; -> draining at shutdown
        self.error: str | None = None
        #: Called when loading fails (the CLI stops the server so orchestration restarts it).
        self.on_fatal: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def pick(self, kind: str, requested: str | None) -> ServedModel:
        """The served model: by name (or model path), else the only one of its kind."""
        candidates = [m for m in self.served if m.kind == kind]
        if requested:
            for m in candidates:
                if requested in (m.name, m.spec.model):
                    return m
        if len(candidates) == 1:
            return candidates[0]
        names = ", ".join(f"{m.name} ({m.kind})" for m in self.served)
        if not candidates:
            raise ApiError(
                404, f"This server serves no {kind}. Served models: {names}.", "NotFound"
            )
        raise ApiError(
            404,
            f"Model {requested!r} is not served here; pass one of these as 'model': {names}.",
            "NotFound",
        )

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(
                503,
                f"Server is not ready ({self.status}); wait until GET /health answers 200.",
                "Unhealthy",
                {"retry-after": "1"},
            )

    def check_texts(self, texts: Sequence[str], field: str) -> None:
        if not texts:
            raise ApiError(422, f"'{field}' must contain at least one text.", "Empty")
        if len(texts) > self.config.max_client_batch:
            raise ApiError(
                413,
                f"{len(texts)} texts in '{field}' exceed the limit of "
                f"{self.config.max_client_batch} per request (--max-client-batch). Split them over "
                "several requests.",
                "Validation",
            )

    async def _admitted(
        self, operation: str, model: ServedModel, n: int, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """One model call inside an admission slot and a span; raises the pool's exceptions
        (and :class:`~.errors.Overloaded`), which :mod:`.errors` maps to statuses."""
        self.check_ready()
        spec, batch_size = model.spec, self.config.batch_size
        with model_span(operation, spec, batch_size=batch_size, items=n, served_name=model.name):
            async with self.admission.enter():
                return await fn(spec, *args, batch_size)

    async def scores(
        self,
        model: ServedModel,
        query: str,
        texts: list[str],
        *,
        priority: Lane = "interactive",
        pairs: list[tuple[str, str]] | None = None,
    ) -> list[float]:
        """Scores of ``texts`` against ``query``, in input order; ``pairs`` (already cut or
        windowed by the endpoint) are scored instead when given."""
        self.check_texts(texts, "texts")
        if pairs is None:
            pairs = [(query, text) for text in texts]

        async def score(spec: Any, items: list[tuple[str, str]], batch_size: int) -> list[float]:
            return await self.pool.ascore_pairs(spec, items, batch_size, priority=priority)

        result: list[float] = await self._admitted("rerank", model, len(pairs), score, pairs)
        return result

    async def vectors(
        self,
        model: ServedModel,
        texts: list[str],
        field: str,
        *,
        is_query: bool,
        normalize: bool,
        priority: Lane = "interactive",
    ) -> list[list[float]]:
        """Embeddings of ``texts`` (``field`` names them in errors)."""
        self.check_texts(texts, field)

        async def embed(spec: Any, items: list[str], batch_size: int) -> list[list[float]]:
            return await self.pool.aembed(
                spec, items, batch_size, is_query=is_query, normalize=normalize, priority=priority
            )

        result: list[list[float]] = await self._admitted("embed", model, len(texts), embed, texts)
        return result

    def loaded(self, model: ServedModel) -> Any:
        """The backend object of a served model (its tokenizer, windows); loads it if the pool
        let it go (a release racing that load starts it over, as the model calls do). Call from
        a worker thread (``asyncio.to_thread``): a load blocks."""
        self.check_ready()
        return self.pool._lookup(model.spec)[1]

    async def tokens(self, model: ServedModel) -> TextTokens:
        """The model's tokens (:mod:`.tokens`), for truncation and token counts. Refuses with
        429 first when the server is full: every use tokenizes the request ahead of its model
        call, work a refused request must not do."""
        self.admission.refuse_if_full()
        return await asyncio.to_thread(lambda: text_tokens(self.loaded(model)))

    async def load(self) -> None:
        """Load and warm up every served model; ``status`` says how far it got."""
        self.status = "loading"
        specs = [m.spec for m in self.served]
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.pool.preload, *specs, warmup=self.config.warmup)
        except Exception as exc:
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("rag-rerank serve: loading failed: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.status == "loading":
            self.status = "ok"
            logger.info(
                "rag-rerank serve: %d model(s) loaded and warmed up in %.1fs: %s",
                len(specs),
                time.perf_counter() - start,
                ", ".join(m.name for m in self.served),
            )

    def model_info(self, model: ServedModel) -> dict[str, Any]:
        stats = self.pool.spec_stats(model.spec)
        return {
            "name": model.name,
            "kind": model.kind,
            "model": model.spec.model,
            "backend": model.spec.backend,
            "device": stats["device"],
            "dtype": stats["dtype"],
            "dtype_reason": stats["dtype_reason"],
            "max_length": model.spec.max_length,
            "loaded": stats["loaded"],
        }
