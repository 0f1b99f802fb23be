"""``SharedEmbedding``: a LlamaIndex ``BaseEmbedding`` on a shared embedder handle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

# The guard first: without llama-index-core, a MissingDependencyError naming the extra.
from .._exitsafe import to_thread
from . import _compat  # noqa: F401

# isort: split

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from ..adapter_base import SharedModelFields, from_settings, sync_override
from ..exceptions import ConfigurationError, InvalidInputError
from ..inputs import text_list
from ._args import check_arguments
from ._state import SharedPoolState
from ._stock_args import (
    EMBEDDING_POSITIONAL,
    ST_EMBEDDER_KWARGS,
    bind_positional,
    default_query_instruction,
    default_text_instruction,
    embedding_arguments,
)

if TYPE_CHECKING:
    import os

    from llama_index.core.callbacks import CallbackManager

    from ..pool import ModelPool

__all__ = ["SharedEmbedding"]

#: HuggingFaceEmbedding's arguments that are not fields here (translated before validation).
STOCK_NAMES = frozenset(EMBEDDING_POSITIONAL) | ST_EMBEDDER_KWARGS
#: The backend option holding its own instruction, for documents and for queries.
_BACKEND_INSTRUCTION = {
    False: "passage_instruction_for_retrieval",
    True: "query_instruction_for_retrieval",
}


def _batch_texts(texts: Any) -> list[str]:
    """``texts`` as a list of str, checked before any model work (:func:`text_list`).

    LlamaIndex's batching iterates ``texts``: ``get_text_embedding_batch("hello")`` returned five
    vectors, one per letter (the stock class does the same), and a bad item deep in a long list
    was reported by its index within one ``embed_batch_size`` chunk (``text #1``), not in
    ``texts``. Any iterable of str is accepted (a generator too: LlamaIndex needs ``len``).
    """
    return text_list(
        texts,
        "get_text_embedding_batch",
        "Wrap it in a list, or call get_text_embedding(text) for one text.",
    )


def _one_text(text: Any, call: str) -> str:
    """One text of a single-text call, checked before the pool sees it: the pool's own check
    came after the model had loaded (seconds to minutes for a big model, for an input that was
    never going to work) and named it ``text #0`` with no hint that a list is the batch call."""
    if isinstance(text, str):
        return text
    hint = (
        " For several texts use get_text_embedding_batch(texts)."
        if isinstance(text, (list, tuple))
        else " Convert it to text first (rag-rerank-plugins never guesses how to stringify it)."
    )
    raise InvalidInputError(f"{call} takes one str, got {type(text).__name__}.{hint}")


class SharedEmbedding(SharedPoolState, SharedModelFields, BaseEmbedding):
    """Embeddings for LlamaIndex indexes; one model per process however many instances.

    Takes every argument of ``HuggingFaceEmbedding`` (llama-index-embeddings-huggingface) with
    the same meaning, positionally too: ``model_name``, ``max_length``, the instructions,
    ``normalize``, ``embed_batch_size``, ``cache_folder``, ``trust_remote_code``, ``device``,
    ``callback_manager``, ``num_workers``, ``show_progress_bar`` and its ``**model_kwargs`` for
    sentence-transformers (``revision``, ``local_files_only``, ``token``, ``truncate_dim``,
    ``model_kwargs={"dtype": ...}``, ``backend="onnx"``/``"openvino"``, ...), so switching is a
    one-line change. ``parallel_process=True`` is refused (the pool already serves concurrent
    callers); an unknown argument (a typo) raises instead of being ignored.
    ``embed_batch_size`` is both LlamaIndex's chunk size and the forward-pass batch size.

    Prompts as in ``HuggingFaceEmbedding``: queries get ``query_instruction``, documents
    ``text_instruction`` (None or '': its default for the BGE and Instructor names, else nothing),
    and never the prompts a model's sentence-transformers config declares, so vectors equal those
    of an index built with the stock class; ``model_prompts=True`` uses the model's own prompts
    where no instruction is given. The instructions are per-call prompts, not part of the model:
    adapters with different instructions share one loaded model.

    A deep copy shares the pool; a pickled adapter uses the default pool where it is unpickled.
    """

    # extra="forbid": a silently dropped argument (a typo, an instruction) changes results unseen.
    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        extra="forbid",
        hide_input_in_errors=True,  # a token or a URL's password would show (the start of it)
    )
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
        description="Where the backend keeps downloaded files (None: the Hugging Face cache; "
        "HuggingFaceEmbedding's default is LlamaIndex's cache folder). A backend option, so "
        "part of the spec.",
    )
    model_prompts: bool = Field(
        default=False,
        description="Where no instruction is given, use the prompts the model's "
        "sentence-transformers config declares (encode_query/encode_document). False (as "
        "HuggingFaceEmbedding): no prompt, except its defaults for BGE and Instructor names.",
    )

    if TYPE_CHECKING:

        def __init__(
            self,
            model_name: str = ...,
            tokenizer_name: Literal["deprecated"] = "deprecated",
            pooling: Literal["deprecated"] = "deprecated",
            max_length: int | None = None,
            query_instruction: str | None = None,
            text_instruction: str | None = None,
            normalize: bool = True,
            model: Literal["deprecated"] = "deprecated",
            tokenizer: Literal["deprecated"] = "deprecated",
            embed_batch_size: int = ...,
            cache_folder: str | os.PathLike[str] | None = None,
            trust_remote_code: bool = False,
            device: str | None = ...,
            callback_manager: CallbackManager | None = None,
            parallel_process: Literal[False] = False,
            target_devices: list[str] | None = None,
            show_progress_bar: bool = False,
            *,
            show_progress: bool = False,
            backend: str = ...,
            model_prompts: bool = False,
            dtype: str = ...,
            model_kwargs: dict[str, Any] | None = ...,
            pool: ModelPool | None = None,
            priority: Literal["interactive", "bulk"] = "interactive",
            num_workers: int | None = None,
            embeddings_cache: Any = None,
            rate_limiter: Any = None,
            # HuggingFaceEmbedding's **model_kwargs: SentenceTransformer's keyword arguments.
            modules: Any = None,
            default_prompt_name: str | None = None,
            revision: str | None = None,
            local_files_only: bool = False,
            token: bool | str | None = None,
            use_auth_token: bool | str | None = None,
            processor_kwargs: dict[str, Any] | None = None,
            tokenizer_kwargs: dict[str, Any] | None = None,
            config_kwargs: dict[str, Any] | None = None,
            use_kernels: bool = False,
            kernel_config: Any = None,
            model_card_data: Any = None,
            similarity_fn_name: Any = None,  # a name or SentenceTransformer's SimilarityFunction
            truncate_dim: int | None = None,
        ) -> None:
            """For type checkers only: HuggingFaceEmbedding's parameters (positional too, and
            its ``**model_kwargs`` by name), then ours. The runtime ``__init__(*args, **data)``
            binds the positional ones, and told type checkers that any keyword was fine."""

    else:

        def __init__(self, *args: Any, **data: Any) -> None:
            # HuggingFaceEmbedding's parameters may be given positionally (model_name first).
            super().__init__(**bind_positional("SharedEmbedding", EMBEDDING_POSITIONAL, args, data))

    @model_validator(mode="before")
    @classmethod
    def _stock_arguments(cls, data: Any) -> Any:
        # HuggingFaceEmbedding's names first (they are not fields), then the unknown-name check.
        return check_arguments(cls, embedding_arguments(data), STOCK_NAMES)

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

    # HuggingFaceEmbedding's attribute name, read and set as there: code that toggles
    # ``embed_model.show_progress_bar = True`` before building an index keeps working.
    @property
    def show_progress_bar(self) -> bool:
        """:attr:`show_progress` under ``HuggingFaceEmbedding``'s name (settable too)."""
        return self.show_progress

    @show_progress_bar.setter
    def show_progress_bar(self, value: bool) -> None:
        self.show_progress = value

    def get_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """LlamaIndex's batched embedding (its own tqdm bar), on when either flag asks for it.

        ``texts`` is checked first (:func:`_batch_texts`): a single str is refused rather than
        embedded letter by letter, and a bad item is named by its index in ``texts``.
        """
        # The base's own function, not its span wrapper: LlamaIndex's mixin already wraps this
        # override in the same span, and calling the wrapped base nested a second one.
        return _unwrapped(BaseEmbedding.get_text_embedding_batch)(
            self, _batch_texts(texts), show_progress=show_progress or self.show_progress, **kwargs
        )

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """Async :meth:`get_text_embedding_batch`, with the same checks."""
        return await _unwrapped(BaseEmbedding.aget_text_embedding_batch)(
            self, _batch_texts(texts), show_progress=show_progress or self.show_progress, **kwargs
        )

    def _prompt(self, is_query: bool) -> str | None:
        """HuggingFaceEmbedding's prompt: ``instruction or <its default for the name>``; '' is an
        explicit "no prompt" (the model's configured prompts are not used), None the model's own
        prompt (only with ``model_prompts``)."""
        instruction = self.query_instruction if is_query else self.text_instruction
        if instruction:
            return instruction
        if self.model_prompts:
            return None
        # An instruction configured in the backend's own options (flag-bge-m3's
        # query_instruction_for_retrieval) applies, as through the LangChain adapter: a prompt
        # here would replace it ('' included: it was dropped without a word).
        if self.spec.option(_BACKEND_INSTRUCTION[is_query]) is not None:
            return None
        default = default_query_instruction if is_query else default_text_instruction
        return default(self.model_name)

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
        return self._embed([_one_text(query, "get_query_embedding")], is_query=True)[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        if sync_override(self, SharedEmbedding, "_get_query_embedding", "_aget_query_embedding"):
            return await to_thread(self._get_query_embedding, query)  # as stock: the override
        query = _one_text(query, "aget_query_embedding")
        return (await self._aembed([query], is_query=True))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([_one_text(text, "get_text_embedding")], is_query=False)[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        if sync_override(self, SharedEmbedding, "_get_text_embedding", "_aget_text_embedding"):
            return await to_thread(self._get_text_embedding, text)  # as stock: the override
        text = _one_text(text, "aget_text_embedding")
        return (await self._aembed([text], is_query=False))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts, is_query=False)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        if sync_override(self, SharedEmbedding, "_get_text_embeddings", "_aget_text_embeddings"):
            return await to_thread(self._get_text_embeddings, texts)  # as stock: the override
        return await self._aembed(texts, is_query=False)


def _unwrapped(method: Any) -> Any:
    """The function under LlamaIndex's span decorator (``__wrapped__``), or ``method``."""
    return getattr(method, "__wrapped__", method)
