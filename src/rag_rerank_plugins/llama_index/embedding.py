"""``SharedEmbedding``: a LlamaIndex ``BaseEmbedding`` on a shared embedder handle."""

from __future__ import annotations

from typing import Any

# The guard first: without llama-index-core, a MissingDependencyError naming the extra.
from . import _compat  # noqa: F401

# isort: split

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from ..adapter_base import SharedModelFields, from_settings
from ..exceptions import ConfigurationError
from ._args import check_arguments

__all__ = ["SharedEmbedding"]


class SharedEmbedding(SharedModelFields, BaseEmbedding):
    """Embeddings for LlamaIndex indexes; one model per process however many instances.

    Same arguments as ``HuggingFaceEmbedding`` where they apply (``model_name``, ``device``,
    ``embed_batch_size``, ``normalize``, ``max_length``, ``query_instruction``,
    ``text_instruction``, ``trust_remote_code``, ``cache_folder``, ``show_progress_bar``), so
    switching is a one-line change; an unknown argument (a typo, or one of HuggingFaceEmbedding's
    that has no meaning here, such as ``parallel_process``) raises instead of being ignored.
    ``embed_batch_size`` is both LlamaIndex's chunk size and the forward-pass batch size.

    The instructions are per-call prompts, not part of the model: adapters with different
    instructions share one loaded model.
    """

    # extra="forbid": a silently dropped argument (a typo, an instruction) changes results unseen.
    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")
    _kind = "embedder"
    _model_field = "model_name"

    model_name: str = Field(
        default_factory=from_settings("embedder_model"),
        description="Hub name or local path (default: RAG_RERANK_EMBEDDER_MODEL).",
    )
    backend: str = Field(default_factory=from_settings("embedder_backend"))
    embed_batch_size: int = Field(default_factory=from_settings("batch_size"), gt=0, le=2048)
    normalize: bool = Field(default=True, description="Scale vectors to unit length.")
    show_progress: bool = Field(
        default=False,
        validation_alias=AliasChoices("show_progress", "show_progress_bar"),
        description="Default for get_text_embedding_batch(show_progress=...): a tqdm bar while "
        "bulk texts are embedded (index building). Either one switches the bar on. "
        "Also accepted as show_progress_bar (HuggingFaceEmbedding's name).",
    )
    query_instruction: str | None = Field(
        default=None,
        description="Put before every query (HuggingFaceEmbedding's query_instruction), in place "
        "of the model's own query prompt. None or '': the model's own prompt.",
    )
    text_instruction: str | None = Field(
        default=None,
        description="Put before every document text, in place of the model's own document "
        "prompt. None or '': the model's own prompt.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow custom model code from the hub (a backend option, so part of the spec).",
    )
    cache_folder: str | None = Field(
        default=None,
        description="Where the backend keeps downloaded files (None: the Hugging Face cache). "
        "A backend option, so part of the spec.",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, data: Any) -> Any:
        return check_arguments(cls, data)

    @model_validator(mode="after")
    def _check_options_agree(self) -> SharedEmbedding:
        # Given twice (a field and model_kwargs) with different values: say so, never pick one.
        for key, value in self._extra_options().items():
            if key in self.model_kwargs and self.model_kwargs[key] != value:
                raise ConfigurationError(
                    f"{key}={value!r} contradicts model_kwargs[{key!r}]="
                    f"{self.model_kwargs[key]!r}; pass only one."
                )
        return self

    def _extra_options(self) -> dict[str, Any]:
        # Only when set, so the spec equals that of other adapters naming the same model.
        options = super()._extra_options()
        if self.trust_remote_code:
            options["trust_remote_code"] = True
        if self.cache_folder is not None:
            options["cache_folder"] = self.cache_folder
        return options

    @classmethod
    def class_name(cls) -> str:
        return "SharedEmbedding"

    def get_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """LlamaIndex's batched embedding (its own tqdm bar), on when either flag asks for it."""
        return super().get_text_embedding_batch(
            texts, show_progress=show_progress or self.show_progress, **kwargs
        )

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        return await super().aget_text_embedding_batch(
            texts, show_progress=show_progress or self.show_progress, **kwargs
        )

    def _prompt(self, is_query: bool) -> str | None:
        # As HuggingFaceEmbedding: an empty instruction means "the default" (the model's prompt).
        return (self.query_instruction if is_query else self.text_instruction) or None

    def _embed(self, texts: list[str], is_query: bool) -> list[Embedding]:
        return self._pool_embed(
            self.spec,
            texts,
            self.embed_batch_size,
            is_query=is_query,
            normalize=self.normalize,
            prompt=self._prompt(is_query),
        )

    async def _aembed(self, texts: list[str], is_query: bool) -> list[Embedding]:
        return await self._pool_aembed(
            self.spec,
            texts,
            self.embed_batch_size,
            is_query=is_query,
            normalize=self.normalize,
            prompt=self._prompt(is_query),
        )

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query], is_query=True)[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._aembed([query], is_query=True))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text], is_query=False)[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aembed([text], is_query=False))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts, is_query=False)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._aembed(texts, is_query=False)
