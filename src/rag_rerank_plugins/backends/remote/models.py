"""The loaded remote models: :class:`RemoteReranker` and :class:`RemoteEmbedder`, and their loaders.

What the pool loads for ``backend="remote-reranker"`` / ``"remote-embedder"``. A model splits
its input into requests (per distinct query for rerank; by count and bytes, :mod:`.packing`),
has its protocol (:mod:`.protocols`) build each request and parse each answer, and puts the
results back in the caller's order. Each operation is written once, as a plan
(:mod:`.client`): ``score_pairs`` runs it with ``client.run`` (pooled ``httpx.Client``),
``ascore_pairs`` with ``client.arun`` (the loop's ``httpx.AsyncClient``); likewise ``embed`` /
``aembed``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...exceptions import RemoteError
from ..base import EmbedderModel, ModelProvider, RerankerModel, Task
from .client import Plan, RemoteClient, load_httpx
from .packing import HEADROOM_BYTES, Packed, RequestLimits, json_bytes, pack
from .protocols import PROTOCOLS, Call, UnexpectedResponse, get_protocol
from .settings import RemoteSettings

if TYPE_CHECKING:
    from ...spec import ModelSpec

__all__ = ["RemoteEmbedder", "RemoteReranker", "load_embedder", "load_reranker"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    """One planned request: its call, its encoded body, and where its results go."""

    positions: list[int]  # indices in the caller's input, in the order of the call's texts
    call: Call
    body: bytes


class _RemoteModel:
    thread_safe = True
    native = False  # HTTP calls: interpreter exit need not wait for them
    device = "remote"
    dtype = "remote"

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        self.settings = settings
        self.what = f"{spec.backend} {settings.base_url}"
        self.protocol = get_protocol(settings.protocol)
        self.client = RemoteClient(settings, self.what, self.protocol)
        self._warned_truncation = False

    def close(self) -> None:
        self.client.close()

    def _requests(
        self,
        texts: Sequence[str],
        positions: Sequence[int],
        build: Callable[[Sequence[str]], Call],
        limits: RequestLimits,
        batch_size: int,
    ) -> Iterator[_Request]:
        """Requests for ``texts``, each body under the limits; ``build`` makes the protocol's
        call for a list of texts (the same query, prompt and flags in every request)."""
        overhead = len(json_bytes(build([]).payload))
        packed = pack(
            texts,
            positions,
            overhead=overhead,
            limits=limits,
            batch_size=batch_size,
            truncate=self.settings.truncate,
            what=self.what,
        )
        if packed.truncated:
            self._log_truncation(packed, limits, overhead)
        for chunk in packed.chunks:
            call = build(packed.texts[chunk.start : chunk.stop])
            yield _Request([positions[i] for i in chunk], call, json_bytes(call.payload))

    def _log_truncation(self, packed: Packed, limits: RequestLimits, overhead: int) -> None:
        level = logging.DEBUG if self._warned_truncation else logging.WARNING
        self._warned_truncation = True
        logger.log(
            level,
            "rag-rerank remote: %s: cut %d text(s) of up to %d bytes to the %d bytes that fit in "
            "one request (limit %d bytes, %s); the model reads only its first max_length tokens. "
            "Pass truncate=False to get an error instead.",
            self.what,
            packed.truncated,
            packed.longest,
            limits.max_bytes - HEADROOM_BYTES - overhead,
            limits.max_bytes,
            limits.source,
        )

    def _send(self, request: _Request) -> Plan[list[Any]]:
        """Post one request and parse its answer: one result per text, in the request's order."""
        body = yield from self.client.post_plan(request.call.path, request.body)
        try:
            return request.call.parse(body)
        except UnexpectedResponse as exc:
            raise RemoteError(
                f"{self.what}: unexpected response from "
                f"{self.settings.base_url + request.call.path}: expected {exc.expected}, got "
                f"{str(body)[:160]!r}. Check the 'protocol' option "
                f"({', '.join(PROTOCOLS)}).",
                url=self.settings.base_url + request.call.path,
            ) from None


class RemoteReranker(_RemoteModel, RerankerModel):
    """Scores pairs on a rerank server: one request per distinct query and chunk of texts that
    fits the server's limits (``batch_size`` texts, its body size)."""

    def _score_plan(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> Plan[list[float]]:
        scores = [0.0] * len(pairs)
        if not pairs:
            return scores
        limits = yield from self.client.limits_plan()
        groups: dict[str, list[int]] = {}
        for i, (query, _text) in enumerate(pairs):
            groups.setdefault(query, []).append(i)
        for query, positions in groups.items():
            texts = [pairs[i][1] for i in positions]
            build = functools.partial(self.protocol.rerank, self.settings, query)
            for request in self._requests(texts, positions, build, limits, batch_size):
                # Rerank answers index into the request's own texts: map them back to the input.
                results = yield from self._send(request)
                for i, score in zip(request.positions, results, strict=True):
                    scores[i] = score
        return scores

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return self.client.run(self._score_plan(pairs, batch_size))

    async def ascore_pairs(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> list[float]:
        """Like :meth:`score_pairs` on the event loop's own pooled ``AsyncClient``."""
        return await self.client.arun(self._score_plan(pairs, batch_size))

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        return await self.ascore_pairs(items, batch_size)


class RemoteEmbedder(_RemoteModel, EmbedderModel):
    """Embeds texts on an embedding server, in requests that fit its limits (``batch_size``
    texts, its body size)."""

    def __init__(self, spec: ModelSpec, settings: RemoteSettings) -> None:
        super().__init__(spec, settings)
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.embed(["dimension probe"], batch_size=1, is_query=False)
        assert self._dimension is not None
        return self._dimension

    def _embed_plan(
        self,
        texts: Sequence[str],
        batch_size: int,
        is_query: bool,
        normalize: bool,
        prompt: str | None,
    ) -> Plan[list[list[float]]]:
        vectors: list[list[float]] = []
        if not texts:
            return vectors
        # Servers know no per-request instruction: it is prepended, as sentence-transformers does.
        texts = [prompt + text for text in texts] if prompt else list(texts)
        limits = yield from self.client.limits_plan()

        def build(chunk: Sequence[str]) -> Call:
            return self.protocol.embed(self.settings, chunk, is_query=is_query, normalize=normalize)

        for request in self._requests(texts, range(len(texts)), build, limits, batch_size):
            vectors.extend((yield from self._send(request)))  # requests follow the input's order
        if vectors:
            # One size in the whole answer before it may fix the dimension: a ragged answer is
            # refused, and must not pin a size that every later, correct answer then fails.
            sizes = sorted({len(v) for v in vectors})
            if len(sizes) > 1:
                raise RemoteError(
                    f"{self.what}: the server answered vectors of {len(sizes)} sizes in one call "
                    f"({', '.join(map(str, sizes[:4]))}); an index takes one. Check the server."
                )
            self._pin_dimension(sizes[0])
        # Normalising here too makes normalize=True hold whatever the server's defaults are.
        return [_normalize(v) for v in vectors] if normalize else vectors

    def _pin_dimension(self, dimension: int) -> None:
        """The first answer fixes the dimension, as a local model's weights do: a server that
        later answers another one (a different model behind the URL) would put vectors of two
        sizes into one index, so that is an error until the model is released and reloaded."""
        if self._dimension is not None and dimension != self._dimension:
            raise RemoteError(
                f"{self.what}: the server answered {dimension}-dimensional vectors, but "
                f"{self._dimension}-dimensional ones before: the model behind the URL changed. "
                "Vectors of both sizes cannot share an index; release the model "
                "(pool.release(spec)) to start over with the new one, and re-embed."
            )
        self._dimension = dimension

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        return self.client.run(self._embed_plan(texts, batch_size, is_query, normalize, prompt))

    async def aembed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        is_query: bool = False,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        """Like :meth:`embed` on the event loop's own pooled ``AsyncClient``."""
        plan = self._embed_plan(texts, batch_size, is_query, normalize, prompt)
        return await self.client.arun(plan)

    async def arun(self, task: Task, items: Sequence[Any], batch_size: int) -> list[Any]:
        return await self.aembed(
            items,
            batch_size=batch_size,
            is_query=task.is_query,
            normalize=task.normalize,
            prompt=task.prompt,
        )


def _normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


def load_reranker(spec: ModelSpec, provider: ModelProvider) -> RemoteReranker:
    """Loader of ``backend="remote-reranker"``: validates options, contacts nothing yet."""
    load_httpx()
    return RemoteReranker(spec, RemoteSettings.from_spec(spec, "rerank"))


def load_embedder(spec: ModelSpec, provider: ModelProvider) -> RemoteEmbedder:
    """Loader of ``backend="remote-embedder"``: validates options, contacts nothing yet."""
    load_httpx()
    return RemoteEmbedder(spec, RemoteSettings.from_spec(spec, "embed"))
