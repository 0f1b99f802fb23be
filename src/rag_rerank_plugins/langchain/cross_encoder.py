"""``SharedCrossEncoder``: LangChain's ``BaseCrossEncoder`` interface on a shared handle.

For code that already uses LangChain's ``CrossEncoderReranker(model=HuggingFaceCrossEncoder(...))``:
swap in ``SharedCrossEncoder(model_name=...)`` and the model is loaded once per process.
"""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.cross_encoders import BaseCrossEncoder
from pydantic import AliasChoices, ConfigDict, Field

from ..adapter_base import SharedModelFields, from_settings
from ..exceptions import InvalidInputError

if TYPE_CHECKING:
    from ..pool import ModelPool

__all__ = ["SharedCrossEncoder"]


def _checked_pairs(text_pairs: Any) -> list[tuple[str, str]]:
    """``text_pairs`` as a list of (query, passage) str tuples, checked before the model loads.

    Strings are sequences too, so without this a bare str or a single unwrapped pair was taken
    apart letter by letter into confusing pair errors, or (two-letter strings) silently scored.
    """
    if isinstance(text_pairs, str) or not isinstance(text_pairs, Iterable):
        raise InvalidInputError(
            "score takes a list of (query, passage) pairs, got "
            f"{type(text_pairs).__name__} {str(text_pairs)[:40]!r}. "
            "For one pair pass [(query, passage)]."
        )
    pairs = []
    for i, pair in enumerate(text_pairs):
        if isinstance(pair, str):
            raise InvalidInputError(
                f"text_pairs[{i}] is a str, not a (query, passage) pair. For one pair pass "
                "[(query, passage)], not (query, passage)."
            )
        if not isinstance(pair, (tuple, list)):
            raise InvalidInputError(
                f"text_pairs[{i}] is {type(pair).__name__}, not a (query, passage) tuple."
            )
        if len(pair) != 2:
            raise InvalidInputError(
                f"text_pairs[{i}] has {len(pair)} item{'s' if len(pair) != 1 else ''}; "
                "expected (query, passage)."
            )
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"text_pairs[{i}][{j}] is {type(text).__name__}, not str. Convert it to text "
                    "first."
                )
        pairs.append((pair[0], pair[1]))
    return pairs


class SharedCrossEncoder(SharedModelFields, BaseCrossEncoder):
    """``score(pairs)`` via the shared pool: a drop-in for langchain-community's
    ``HuggingFaceCrossEncoder``, with its arguments and their meaning.

    ``model_name=`` and ``model_kwargs=`` (``CrossEncoder``'s keyword arguments: ``device``,
    ``max_length``, ``token``, ``trust_remote_code``, ``revision``, ``activation_fn``,
    ``num_labels``, nested ``model_kwargs``/``config_kwargs``/``processor_kwargs``, ``backend``,
    ``prompts``, ...; see :func:`rag_rerank_plugins._stock.hf_model_kwargs`). Scores equal
    ``HuggingFaceCrossEncoder.score``: a two-label model is scored by its label 1 ("relevant").
    ``client`` is accepted and ignored, as the stock class replaces it with the model it loads;
    the shared model is :meth:`handle`.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        populate_by_name=True,
        extra="forbid",
        hide_input_in_errors=True,  # a token or a URL's password would show (the start of it)
    )

    model: str = Field(
        default_factory=from_settings("reranker_model"),
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = Field(default_factory=from_settings("reranker_backend"))
    batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0)
    client: Any = Field(
        default=None,
        exclude=True,
        repr=False,
        description="Accepted for HuggingFaceCrossEncoder compatibility and ignored (the stock "
        "class overwrites it with the model it loads); the shared model is handle().",
    )

    _st_model_kwargs = True

    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            model: str = ...,
            model_name: str = ...,
            backend: str = ...,
            batch_size: int = ...,
            client: Any = None,
            device: str | None = ...,
            dtype: str = ...,
            max_length: int | None = None,
            model_kwargs: dict[str, Any] = ...,
            pool: ModelPool | None = None,
            priority: Literal["interactive", "bulk"] = "interactive",
        ) -> None:
            """For type checkers only (runtime: pydantic's): they do not read validation
            aliases, so ``model_name=`` (HuggingFaceCrossEncoder's spelling) was a false error."""

    @property
    def model_name(self) -> str:
        """The model's hub name or local path: :attr:`model` under ``HuggingFaceCrossEncoder``'s
        name (settable too, as there), so code reading ``reranker.model_name`` keeps working."""
        return self.model

    @model_name.setter
    def model_name(self, value: str) -> None:
        self.model = value

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        """One relevance score per (query, passage) pair, in input order.

        Raises :class:`InvalidInputError` (before any model work) unless ``text_pairs`` is a list
        (or other iterable) of 2-item tuples/lists of str. No pairs: ``[]``, nothing loads.
        """
        pairs = _checked_pairs(text_pairs)
        if not pairs:
            return []
        return self._pool_score(self.spec, pairs, self.batch_size)
