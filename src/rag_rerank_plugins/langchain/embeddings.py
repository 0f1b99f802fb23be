"""``SharedEmbeddings``: LangChain ``Embeddings`` on a shared embedder handle."""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from .._progress import chunks, progress_bar
from ..adapter_base import SharedModelFields, from_settings
from ..exceptions import ConfigurationError, InvalidInputError

__all__ = ["SharedEmbeddings"]


def _document_texts(texts: Any) -> list[str]:
    """``texts`` as a list of str, checked before the model loads.

    A bare str is iterable too: without this check ``embed_documents("hello")`` returned five
    vectors, one per letter.
    """
    if isinstance(texts, str):
        example = repr(texts) if len(texts) <= 40 else "text"
        raise InvalidInputError(
            f"embed_documents takes a list of str, got a single str {texts[:40]!r}. Wrap it in a "
            f"list: embed_documents([{example}]) (or embed_query({example}) for a query)."
        )
    if not isinstance(texts, Iterable):
        raise InvalidInputError(f"embed_documents takes a list of str, got {type(texts).__name__}.")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"texts[{i}] is {type(text).__name__}, not str. Convert it to text first "
                "(rag-rerank-plugins never guesses how to stringify a document)."
            )
    return items


#: ``encode_kwargs`` / ``query_encode_kwargs`` keys of ``HuggingFaceEmbeddings`` with a meaning
#: here, and the field each one sets (queries: only the normalisation differs per call kind).
_ENCODE_KEYS = {
    "normalize_embeddings": "normalize_embeddings",
    "batch_size": "batch_size",
    "show_progress_bar": "show_progress",
}
_QUERY_ENCODE_KEYS = {
    "normalize_embeddings": "query_normalize_embeddings",
    "batch_size": None,  # one query is one batch: accepted, nothing to set
    "show_progress_bar": None,
}
_MULTI_PROCESS = (
    "multi_process=True is not supported: the shared pool already batches concurrent requests "
    "into one model per process; for several processes (or machines) sharing one model, run "
    "`rag-rerank serve` and use backend='remote-embedder'."
)


def _set_once(data: dict[str, Any], field: str, value: Any, source: str) -> None:
    """``data[field] = value`` unless the caller set ``field`` to something else."""
    if field in data and data[field] != value:
        raise ConfigurationError(
            f"{field}={data[field]!r} and {source}={value!r} disagree; give it once."
        )
    data[field] = value


def _map_encode_kwargs(
    data: dict[str, Any], argument: str, table: Mapping[str, str | None]
) -> dict[str, Any]:
    kwargs = data.pop(argument)
    if kwargs is None:
        return data
    if not isinstance(kwargs, dict):
        raise ConfigurationError(f"{argument} must be a dict, got {type(kwargs).__name__}.")
    unknown = sorted(set(kwargs) - set(table))
    if unknown:
        raise ConfigurationError(
            f"{argument} key(s) {', '.join(map(repr, unknown))} have no meaning here. Supported: "
            f"{', '.join(sorted(table))}. Queries are encoded with the model's query prompt and "
            "documents with its document prompt (encode_query / encode_document); precision is "
            "dtype=, the device device=."
        )
    for key, value in kwargs.items():
        field = table[key]
        if field is not None:
            _set_once(data, field, value, f"{argument}[{key!r}]")
    return data


def _query_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(
            f"embed_query takes one str, got {type(text).__name__}. "
            "Use embed_documents for a list of texts."
        )
    return text


class SharedEmbeddings(SharedModelFields, Embeddings):
    """Embeddings for vector stores and retrievers; one model per process however many instances.

    Queries use the model's query prompt (``encode_query``) and documents its document prompt.
    ``HuggingFaceEmbeddings``' arguments are accepted for a one-line switch: ``model_name=``,
    ``model_kwargs={"device": ...}``, ``cache_folder=``, ``show_progress=``, and
    ``encode_kwargs`` / ``query_encode_kwargs`` with ``normalize_embeddings``, ``batch_size`` or
    ``show_progress_bar``; ``multi_process=True`` is refused with what to do instead.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        populate_by_name=True,
        extra="forbid",
    )
    _kind = "embedder"

    model: str = Field(
        default_factory=from_settings("embedder_model"),
        validation_alias=AliasChoices("model", "model_name"),
        description="Hub name or local path.",
    )
    backend: str = Field(default_factory=from_settings("embedder_backend"))
    batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0)
    normalize_embeddings: bool = Field(default=False, description="Scale vectors to unit length.")
    show_progress: bool = Field(
        default=False,
        description="Show a tqdm bar (on stderr) while embed_documents works through the texts.",
    )
    query_normalize_embeddings: bool | None = Field(
        default=None,
        description="Unit-length query vectors? None: as normalize_embeddings. Set by "
        "HuggingFaceEmbeddings' query_encode_kwargs={'normalize_embeddings': ...}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_hf_embeddings_kwargs(cls, data: Any) -> Any:
        """Take ``HuggingFaceEmbeddings``' arguments where they mean something here, and say what
        to do instead where they don't (rather than pydantic's bare "Extra inputs are not
        permitted"): encode_kwargs / query_encode_kwargs, cache_folder, multi_process."""
        if not isinstance(data, dict):
            return data
        hf_names = ("encode_kwargs", "query_encode_kwargs", "cache_folder", "multi_process")
        if not any(name in data for name in hf_names):
            return data
        data = dict(data)
        if "encode_kwargs" in data:
            data = _map_encode_kwargs(data, "encode_kwargs", _ENCODE_KEYS)
        if "query_encode_kwargs" in data:
            data = _map_encode_kwargs(data, "query_encode_kwargs", _QUERY_ENCODE_KEYS)
        if data.pop("multi_process", False):
            raise ConfigurationError(_MULTI_PROCESS)
        if "cache_folder" in data:
            folder = data.pop("cache_folder")
            kwargs = dict(data.get("model_kwargs") or {})
            if folder is not None:
                if kwargs.get("cache_folder", folder) != folder:
                    raise ConfigurationError(
                        f"cache_folder={folder!r} and model_kwargs['cache_folder']="
                        f"{kwargs['cache_folder']!r} disagree; give it once."
                    )
                kwargs["cache_folder"] = folder  # the sentence-transformers backend option
                data["model_kwargs"] = kwargs
        return data

    def _normalize_queries(self) -> bool:
        if self.query_normalize_embeddings is None:
            return self.normalize_embeddings
        return self.query_normalize_embeddings

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        texts = _document_texts(texts)
        if not self.show_progress:
            return self._pool_embed(
                self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
            )
        spec, vectors = self.spec, []
        with progress_bar(len(texts), "Embedding documents", enabled=True) as bar:
            for chunk in chunks(texts, self.batch_size):
                vectors.extend(
                    self._pool_embed(
                        spec, chunk, self.batch_size, normalize=self.normalize_embeddings
                    )
                )
                bar.update(len(chunk))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        text = _query_text(text)
        return self._pool_embed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self._normalize_queries()
        )[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        texts = _document_texts(texts)
        if not self.show_progress:
            return await self._pool_aembed(
                self.spec, texts, self.batch_size, normalize=self.normalize_embeddings
            )
        spec, vectors = self.spec, []
        with progress_bar(len(texts), "Embedding documents", enabled=True) as bar:
            for chunk in chunks(texts, self.batch_size):
                vectors.extend(
                    await self._pool_aembed(
                        spec, chunk, self.batch_size, normalize=self.normalize_embeddings
                    )
                )
                bar.update(len(chunk))
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        text = _query_text(text)
        vectors = await self._pool_aembed(
            self.spec, [text], self.batch_size, is_query=True, normalize=self._normalize_queries()
        )
        return vectors[0]
