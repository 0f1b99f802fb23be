"""``SharedSemanticCache``: LangChain's ``BaseCache`` on the package's guarded semantic cache.

Why a separate adapter: LangChain's cache contract (``lookup(prompt, llm_string)``) is exact-match
by design, and its semantic caches compare one dense similarity with a threshold, which returns
the answer about Art. 72 for a question about Art. 75. This adapter keeps LangChain's contract
(``set_llm_cache(...)``, sync and async, ``list[Generation]`` in and out) and delegates the
"is this the same question?" decision to :class:`~rag_rerank_plugins.semantic_cache.SemanticCache`
and its guard (``hybrid`` by default).

How a call maps onto the cache:

* **namespace**: the ``llm_string`` (model and invocation parameters) hashed, so two models, or
  one model at two temperatures, never share answers. For chat models everything before the last
  message (system prompt, history) is hashed into the namespace too: the same last question in
  two conversations is two questions. So are the last message's content blocks that are not text
  (images, audio, files) and its ``name``: the same words about two images are two questions.
* **query**: the text the user asked: the prompt of an LLM, the last message's text of a chat model
  (LangChain hands the cache ``dumps(messages)``; embedding that JSON would compare boilerplate).
* **value**: the generations as LangChain's own serialisation (``dumps``), read back with
  ``loads`` restricted to generation, message and document classes, so ``ChatGeneration`` (and
  its ``AIMessage`` with metadata) survive. Metadata values JSON cannot carry (a provider's
  ``datetime``, a numpy number, ``bytes``) are converted first (:func:`_json_safe`): ``dumps``
  wrote them as "not implemented" markers that ``loads`` refuses, so such an entry was stored,
  counted as an update, and failed every read. What still would not read back (another
  LangChain object in the metadata) is not stored: the update counts as an error.

A cache failure never fails the chain: a lookup that raises is a miss, an update that raises is
skipped; both are logged and counted in :meth:`SharedSemanticCache.stats` (``errors``). When the
lookup failed on the transport (a cache server down or hung), the update of that call is not
tried (``skipped``): it would wait as long for nothing.
"""

from __future__ import annotations

# First: a clear MissingDependencyError when langchain-core is missing, not a bare ImportError.
from . import _compat  # noqa: F401  # isort: skip

import hashlib
import inspect
import json
import warnings
from typing import Any

from langchain_core._api import LangChainBetaWarning
from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.documents import Document
from langchain_core.load import Serializable, dumps, loads
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
from pydantic import BaseModel

from .._exitsafe import to_thread
from ..exceptions import ConfigurationError, InvalidInputError
from ..semantic_cache._adapter import AdapterCounters, CacheBackend, RecentFailures
from ..semantic_cache._helpers import SharedResource

__all__ = ["SharedSemanticCache", "split_prompt"]

#: The classes a cached value may rebuild: generations, every message class a generation
#: may hold (a provider's reply can be a ``ChatMessage`` with a custom role, which the stock
#: ``InMemoryCache`` and ``SQLiteCache`` give back) and documents (cited passages in its
#: metadata). Nothing else (a shared cache's content is not trusted to construct arbitrary
#: LangChain objects): a generation holding another object is not cached (``_encode``).
_ALLOWED: list[type[Serializable]] = [
    Generation,
    GenerationChunk,
    ChatGeneration,
    ChatGenerationChunk,
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
    Document,  # plain data; a generation's metadata may cite passages
]


def _json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot carry converted as ``json.dumps(default=str)`` would, so
    LangChain's ``dumps`` writes no "not implemented" marker (which ``loads`` refuses on every
    read): numpy numbers and arrays become numbers and lists, sets lists, pydantic models
    (not LangChain's) their JSON fields, and anything else (``datetime``, ``date``,
    ``Decimal``, ``UUID``, ``bytes``, enums) its ``str``. LangChain objects are left to
    ``dumps``."""
    if value is None or isinstance(value, str | bool | int | float | Serializable):
        return value
    if isinstance(value, dict):
        return {
            key if key is None or isinstance(key, str | bool | int | float) else str(key): (
                _json_safe(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, set | frozenset):  # sorted: the same set is the same JSON
        return [_json_safe(item) for item in sorted(value, key=repr)]
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__.partition(".")[0] == "numpy":
        return _json_safe(tolist())
    if isinstance(value, BaseModel):
        try:
            return _json_safe(value.model_dump(mode="json"))
        except Exception:  # a field pydantic cannot write as JSON either
            return str(value)
    return str(value)


def _safe_fields(model: BaseModel) -> dict[str, Any]:
    """The dict and list fields of ``model`` (a generation, a message) made :func:`_json_safe`."""
    return {
        name: _json_safe(value)
        for name in type(model).model_fields
        if isinstance(value := getattr(model, name, None), dict | list)
    }


def _safe_generation(generation: Generation) -> Generation:
    """A copy of ``generation`` (and of its message) that ``dumps`` writes without markers."""
    update = _safe_fields(generation)
    message = getattr(generation, "message", None)
    if isinstance(message, BaseMessage):
        update["message"] = message.model_copy(update=_safe_fields(message))
    return generation.model_copy(update=update)


def _not_implemented(data: Any) -> str | None:
    """The class of the first value ``dumps`` could not serialise in ``data`` (its parsed
    output), or None."""
    if isinstance(data, dict):
        if data.get("lc") == 1 and data.get("type") == "not_implemented":
            return ".".join(map(str, data.get("id") or ["?"]))
        items: Any = data.values()
    elif isinstance(data, list):
        items = data
    else:
        return None
    for item in items:
        found = _not_implemented(item)
        if found is not None:
            return found
    return None


def _digest(text: str) -> str:
    # surrogatepass: a lone surrogate in an llm_string names a model too (never an exception)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _message_text(message: Any) -> str | None:
    """The text of one serialised message (``dumps`` form), or None when it is not one."""
    if not isinstance(message, dict):
        return None
    kwargs = message.get("kwargs")
    if message.get("type") != "constructor" or not isinstance(kwargs, dict):
        return None
    content = kwargs.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: their text parts
        parts = [
            block if isinstance(block, str) else block.get("text", "")
            for block in content
            if isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")
        ]
        return "\n".join(part for part in parts if part)
    return None


def _last_message_extras(message: dict[str, Any]) -> dict[str, Any]:
    """What else than its text makes the last message's question: its content blocks that are
    not text (images, audio, files), its ``name`` and a ``ChatMessage``'s ``role``; empty when
    there are none."""
    kwargs = message.get("kwargs") or {}
    content = kwargs.get("content")
    blocks = [
        block
        for block in (content if isinstance(content, list) else [])
        if not (isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text"))
    ]
    extras: dict[str, Any] = {}
    if blocks:
        extras["blocks"] = blocks
    if kwargs.get("name"):
        extras["name"] = kwargs["name"]
    if kwargs.get("role"):  # ChatMessage: a custom role asks as someone else
        extras["role"] = kwargs["role"]
    return extras


def split_prompt(prompt: str) -> tuple[str, str]:
    """``(question, context)`` of a prompt as LangChain hands it to a cache.

    A chat model's prompt is ``dumps(messages)``: the question is the last message's text, the
    context everything before it (and the last message's kind, its non-text content blocks,
    its name and a ChatMessage's role), serialised. Any other prompt is the question itself,
    with no context.
    """
    if prompt.startswith("[") and '"lc"' in prompt:
        try:
            messages = json.loads(prompt)
        except ValueError:
            return prompt, ""
        if isinstance(messages, list) and messages:
            text = _message_text(messages[-1])
            if text is not None:
                prior, kind = messages[:-1], messages[-1].get("id", [""])[-1]
                extras = _last_message_extras(messages[-1])
                if not prior and kind == "HumanMessage" and not extras:
                    return text, ""  # one human message: the same namespace as an LLM prompt
                tail = [kind, extras] if extras else [kind]  # no extras: namespaces as before
                return text, json.dumps([*prior, *tail], sort_keys=True, default=str)
    return prompt, ""


class SharedSemanticCache(SharedResource, BaseCache):
    """A LangChain LLM cache that answers paraphrases, but not questions that differ by a number.

    ``cache``: a :class:`~rag_rerank_plugins.semantic_cache.SemanticCache` (or a
    ``RemoteSemanticCache`` for a cache served by ``rag-rerank serve``), shared with other users
    of the same process if you like; by default one is built from ``cache_options`` (for example
    ``guard="rerank"``, ``store="sqlite:///cache.db"``, ``ttl=3600``). ``prefix`` starts every
    namespace this adapter writes, so it can share a cache with other adapters.

    Example::

        from langchain_core.globals import set_llm_cache
        from rag_rerank_plugins.langchain import SharedSemanticCache

        set_llm_cache(SharedSemanticCache(ttl=24 * 3600))
    """

    def __init__(
        self, cache: CacheBackend | None = None, *, prefix: str = "langchain", **cache_options: Any
    ) -> None:
        if cache is not None and cache_options:
            raise ConfigurationError(
                "Pass either a cache or options to build one, not both (got cache= and "
                f"{', '.join(sorted(cache_options))}); set those options on the cache itself."
            )
        if not isinstance(prefix, str) or not prefix or ":" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty str without ':', got {prefix!r} (e.g. 'langchain')."
            )
        if cache is None:
            from ..semantic_cache import SemanticCache

            cache = SemanticCache(**cache_options)
        self.cache: CacheBackend = cache
        self.prefix = prefix
        self._counters = AdapterCounters("SharedSemanticCache")
        #: Keys whose lookup failed on the transport: their update is skipped.
        self._unreachable = RecentFailures()

    # -- keys and values ---------------------------------------------------------------------

    def namespace_for(self, llm_string: str, context: str = "") -> str:
        """The cache namespace of one model configuration (and chat context): for
        ``cache.invalidate(...)`` or to read ``stats()`` per model."""
        name = f"{self.prefix}:{_digest(llm_string)}"
        return f"{name}:{_digest(context)}" if context else name

    def _key(self, prompt: str, llm_string: str) -> tuple[str, str] | None:
        for name, value in (("prompt", prompt), ("llm_string", llm_string)):
            if not isinstance(value, str):
                raise InvalidInputError(
                    f"SharedSemanticCache.{name} must be a str, as LangChain passes it (the "
                    f"prompt text or dumps(messages), the model's llm_string); got "
                    f"{type(value).__name__}."
                )
        question, context = split_prompt(prompt)
        if not question.strip():
            return None  # an empty question is never cached (the cache rejects it)
        return question, self.namespace_for(llm_string, context)

    @staticmethod
    def _encode(return_val: RETURN_VAL_TYPE) -> str:
        """The generations as ``dumps`` writes them, their metadata made JSON first; a
        ``ValueError`` (the update is skipped and counted as an error) when some value still
        comes out as a marker ``loads`` refuses: stored, it failed every read."""
        encoded = dumps([_safe_generation(g) for g in return_val])
        if '"not_implemented"' in encoded:
            found = _not_implemented(json.loads(encoded))
            if found is not None:
                raise ValueError(
                    f"a generation holds a {found} that LangChain cannot serialise, so the "
                    "cached entry could never be read back; not cached. Put JSON values (or "
                    "messages and documents) in the generation's metadata."
                )
        try:  # read back as a hit would: a LangChain object outside _ALLOWED fails there
            SharedSemanticCache._decode(encoded)
        except Exception as exc:
            raise ValueError(
                "a generation holds a value this cache would refuse to rebuild on a hit "
                f"({type(exc).__name__}: {str(exc)[:200]}), so the cached entry could never be "
                "read back; not cached. Cached entries rebuild generations, messages and "
                "documents only: put JSON values in the generation's metadata."
            ) from exc
        return encoded

    @staticmethod
    def _decode(value: Any) -> list[Generation]:
        generations = None
        if isinstance(value, str):
            # langchain_core marks loads as beta; the warning is about its API, not the user's
            # call, and stock caches (InMemoryCache) print none on a hit.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LangChainBetaWarning)
                generations = loads(value, allowed_objects=_ALLOWED)
        if not isinstance(generations, list) or not all(
            isinstance(g, Generation) for g in generations
        ):
            raise TypeError(
                f"the cached value is not a list of Generation (got {type(generations).__name__})"
            )
        return generations

    def _answer(self, hit: Any) -> list[Generation] | None:
        if hit is None:
            self._counters.count("misses")
            return None
        try:
            generations = self._decode(hit.value)
        except Exception as exc:  # a value another writer put in this namespace
            self._counters.count("misses")  # the caller got a miss
            self._counters.failed("reading a cached value", exc)
            return None
        self._counters.count("hits")
        return generations

    # -- BaseCache ---------------------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """The cached generations for this prompt (or a paraphrase the guard accepts), else None."""
        key = self._key(prompt, llm_string)
        if key is None:
            self._counters.count("misses")
            return None
        self._unreachable.pop(key)  # a mark left by a call whose update never came
        try:
            hit = self.cache.lookup(key[0], namespace=key[1])
        except Exception as exc:
            self._lookup_failed(key, exc)
            return None
        return self._answer(hit)

    def _lookup_failed(self, key: tuple[str, str], exc: Exception) -> None:
        if self._counters.lookup_failed(exc):
            self._unreachable.add(key)

    def _skip_update(self, key: tuple[str, str]) -> bool:
        """Whether this prompt's lookup just failed on the transport: then its update would
        wait for the same server for nothing (counted as skipped)."""
        if not self._unreachable.pop(key):
            return False
        self._counters.skipped("update", "its lookup failed on the transport")
        return True

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Store the generations for this prompt; failures are logged, never raised."""
        key = self._key(prompt, llm_string)
        if key is None or self._skip_update(key):
            return
        try:
            stored = self.cache.put(key[0], self._encode(return_val), namespace=key[1])
        except Exception as exc:
            self._counters.update_failed("update", exc)
            return
        # False: the cache skipped it (and logged why); None: a cache that does not say.
        self._counters.count("errors" if stored is False else "updates")

    def clear(self, **kwargs: Any) -> None:
        """Empty the cache; ``clear(llm_string=...)`` only that model's answers, under every
        chat context (system prompt, history) too."""
        llm_string = kwargs.pop("llm_string", None)
        if kwargs:
            raise ConfigurationError(
                f"clear() takes only llm_string=..., got {', '.join(sorted(kwargs))}."
            )
        if llm_string is None:
            self.cache.clear()
        else:
            namespace = self.namespace_for(llm_string)
            if "subspaces" in inspect.signature(self.cache.invalidate).parameters:
                self.cache.invalidate(namespace, subspaces=True)
            else:  # a cache written to the older protocol: its one namespace is all it can
                self.cache.invalidate(namespace)

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        key = self._key(prompt, llm_string)
        if key is None:
            self._counters.count("misses")
            return None
        self._unreachable.pop(key)  # a mark left by a call whose update never came
        try:
            hit = await self.cache.alookup(key[0], namespace=key[1])
        except Exception as exc:
            self._lookup_failed(key, exc)
            return None
        return self._answer(hit)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        key = self._key(prompt, llm_string)
        if key is None or self._skip_update(key):
            return
        try:
            stored = await self.cache.aput(key[0], self._encode(return_val), namespace=key[1])
        except Exception as exc:
            self._counters.update_failed("update", exc)
            return
        self._counters.count("errors" if stored is False else "updates")

    async def aclear(self, **kwargs: Any) -> None:

        await to_thread(self.clear, **kwargs)

    # -- reporting ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This adapter's hits, misses, updates, errors and skipped calls (a cache server that
        was failing), and the cache's own ``stats()``."""
        return self._counters.snapshot(self.cache)

    def __repr__(self) -> str:
        return f"SharedSemanticCache(cache={self.cache!r}, prefix={self.prefix!r})"
