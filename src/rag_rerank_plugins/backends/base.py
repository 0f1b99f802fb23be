"""The seam between the pool and the model libraries: what a loaded backend must provide.

A backend is a loader ``(spec, pool) -> LoadedModel``. The pool owns locking, statistics and
lifetime; a backend only scores or embeds. Keeping that split is what lets one scheduler, one
stats format and one release path serve every library (sentence-transformers, FlagEmbedding,
remote servers, fakes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from ..pool import ModelPool
    from ..spec import ModelSpec

__all__ = ["EmbedderModel", "Kind", "LoadedModel", "Loader", "RerankerModel"]

Kind = Literal["reranker", "embedder"]


class LoadedModel(ABC):
    """A model in memory. Instances are used under the pool's per-handle lock."""

    kind: ClassVar[Kind]
    #: Concrete device and dtype the model runs with (reported in stats and logs).
    device: str = "cpu"
    dtype: str = "float32"

    def close(self) -> None:  # noqa: B027 - optional hook, default is "nothing to free"
        """Drop references to weights so the pool can free memory. Called once, on release."""


class RerankerModel(LoadedModel):
    """Scores (query, passage) pairs; higher means more relevant."""

    kind: ClassVar[Kind] = "reranker"

    @abstractmethod
    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        """One float per pair, in input order."""

    def window_source(self) -> tuple[Any, int] | None:
        """``(tokenizer, max tokens of one query+passage input)`` for long-document windows.

        Optional; the default (None) means this backend cannot be windowed. The tokenizer is the
        model's own Hugging Face tokenizer: :mod:`rag_rerank_plugins.windows` uses a private copy,
        never this object, because the model tokenizes with it under the handle's lock.
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
        """One vector per text, in input order; unit length when ``normalize``.

        ``prompt`` (str) replaces the model's own query/document prompt or instruction for this
        call; a backend with no notion of prompts puts it in front of each text. It is passed
        only when the caller gives one, so a backend without the parameter works until then.
        """


#: A backend: builds a loaded model for a resolved spec. May ask ``pool`` for other handles.
Loader = Callable[["ModelSpec", "ModelPool"], LoadedModel]
