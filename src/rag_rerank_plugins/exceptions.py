"""Every exception this package raises on purpose, in one tree.

Catch :class:`RagRerankError` to handle all of them::

    RagRerankError
    ├── ConfigurationError          (also a ValueError) a spec or adapter setting is invalid
    │   ├── UnknownBackendError     the backend name is not registered
    │   └── InvalidInputError       (also a TypeError) text, query or pairs it cannot accept
    ├── MissingDependencyError      (also an ImportError) an optional extra is not installed,
    │                               or is installed but cannot be imported (a version conflict)
    ├── ModelLoadError              loading failed; the next call retries the load
    │   └── ModelNotFoundError      (also an OSError) neither a local path nor on the hub
    ├── ModelReleasedError          the model was released while a call still needed it
    ├── QueueFullError              the model's request queue is full: back off and retry
    ├── RequestTimeoutError         (also a TimeoutError) the caller's timeout expired
    └── InferenceError              the backend failed during a forward pass
        ├── OutOfMemoryError        out of memory even for a batch of one item
        └── RemoteError             a model server (remote backend) failed the call
            ├── RemoteUnavailableError  unreachable, overloaded (429) or 5xx after all retries
            ├── RemoteTimeoutError      no answer within the timeout (not retried)
            ├── RemoteAuthError         401/403: the bearer token is missing or wrong
            └── RemoteRequestError      another 4xx: too large (413), invalid (422), ...

Messages say what to do next, because they are read in a stack trace at 3 a.m.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = [
    "ConfigurationError",
    "InferenceError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelReleasedError",
    "OutOfMemoryError",
    "QueueFullError",
    "RagRerankError",
    "RemoteAuthError",
    "RemoteError",
    "RemoteRequestError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "RequestTimeoutError",
    "UnknownBackendError",
]


#: A Hugging Face hub id ("name" or "org/name"), as opposed to a local path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _looks_like_path(model: str) -> bool:
    """A filesystem path, never a hub id: absolute, relative to ./ ../ or ~, a Windows drive,
    or more than one '/' (hub ids have at most one)."""
    return (
        model.startswith(("/", "./", "../", "~", "\\", ".\\"))
        or re.match(r"[A-Za-z]:[\\/]", model) is not None
        or model.count("/") >= 2
    )


class RagRerankError(Exception):
    """Base class of every error raised by rag-rerank-plugins."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by message and attributes, not by ``__init__``'s arguments: errors whose
        ``__init__`` builds the message from several arguments (``ModelLoadError(model,
        backend, cause)``) could not be unpickled, so a load failure crossing a process
        boundary (Ray Serve, multiprocessing) became a TypeError."""
        return (_restore, (type(self), self.args, self.__dict__))


def _restore(cls: type[RagRerankError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)  # no __init__: it may take other arguments
    error.args = args  # OSError.__new__ leaves them to an __init__ of a subclass
    error.__dict__.update(state)
    return error


class ConfigurationError(RagRerankError, ValueError):
    """A spec or adapter setting is invalid (bad dtype, device, top_n, ...)."""


class UnknownBackendError(ConfigurationError):
    """The backend named in a spec is not registered."""

    def __init__(self, backend: str, known: list[str]) -> None:
        self.backend = backend
        self.known = known
        super().__init__(
            f"Unknown backend {backend!r}. Known backends: {', '.join(sorted(known))}. "
            "Register your own with rag_rerank_plugins.backends.register_backend()."
        )


class InvalidInputError(ConfigurationError, TypeError):
    """Input that cannot be reranked or embedded (non-string text, missing query, ...)."""


class MissingDependencyError(RagRerankError, ImportError):
    """An optional dependency is missing (or installed but not importable); the message names
    the extra to install. ``broken``: the import error of an installed package (e.g. it needs a
    module another package no longer has), which the message quotes."""

    def __init__(
        self, package: str, extra: str, purpose: str, broken: BaseException | None = None
    ) -> None:
        self.package = package
        self.extra = extra
        if broken is None:
            state = "which is not installed. Install it with"
        else:
            state = (
                f"which is installed but cannot be imported ({type(broken).__name__}: {broken}): "
                "usually a version conflict with another installed package. Install the versions "
                "the extra admits with"
            )
        super().__init__(
            f"{purpose} needs the '{package}' package, {state}: "
            f"pip install 'rag-rerank-plugins[{extra}]'"
        )


class ModelLoadError(RagRerankError):
    """Loading a model failed. Nothing is cached, so the next call tries again."""

    def __init__(self, model: str, backend: str, cause: BaseException | str) -> None:
        self.model = model
        self.backend = backend
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"Could not load model {model!r} with backend {backend!r}: {reason}"
            + _load_hint(model, reason)
        )


#: What the loaders say about a weights file cut short or overwritten (safetensors' header).
_DAMAGED = re.compile(r"deserializing header|incomplete metadata|HeaderTooLarge|InvalidHeader")


def _load_hint(model: str, reason: str) -> str:
    """What to do for the load failures whose library message does not say: a local folder
    that is not a saved model (the libraries talk of a missing ``model_type``), a weights file
    damaged or cut short (of its header)."""
    if _DAMAGED.search(reason):
        return (
            "\nThe weights file looks damaged or cut short (an interrupted download or copy): "
            "download or save the model again."
        )
    folder = isinstance(model, str) and os.path.isdir(model)
    about_config = "model_type" in reason or "config.json" in reason
    saved = folder and any(
        os.path.exists(os.path.join(model, name))
        for name in ("config.json", "modules.json", "adapter_config.json")
    )
    if folder and about_config and not saved:
        return (
            f"\nThe folder {model!r} has no config.json, so it is not a saved model: point at "
            "the folder that holds config.json and the weights (what save_pretrained or "
            "CrossEncoder.save write)."
        )
    return ""


class ModelNotFoundError(ModelLoadError, OSError):
    """The model is not a local directory and could not be fetched (offline or unknown name).

    Also an ``OSError``, as sentence-transformers' and transformers' own error for a missing
    model is: code written for the stock classes (``except OSError:`` around the first call, a
    fallback to another model) keeps catching it."""

    def __init__(self, model: str, backend: str, cause: BaseException | str) -> None:
        super().__init__(model, backend, cause)
        if _looks_like_path(model):
            # A folder that is not there: advice to pass a local folder would name it again.
            self.args = (
                f"{self.args[0]}\nThe folder {model!r} does not exist (or is not a model "
                "folder). Check the path (relative paths are from the working directory, "
                f"{os.getcwd()!r}); to fetch a hub model there, run `hf download <hub name> "
                f"--local-dir {model}` on a connected machine.",
            )
            return
        # huggingface-hub's command is `hf` (`huggingface-cli` is its deprecated old name).
        if _HUB_ID.fullmatch(model):
            folder = f"/models/{model.rsplit('/', 1)[-1]}"
            download = f"`hf download {model} --local-dir {folder}`"
        else:
            folder = "/models/bge-reranker-v2-m3"
            download = "`hf download <hub name> --local-dir <folder>`"
        self.args = (
            f"{self.args[0]}\nThe model was not found locally and the hub could not be reached "
            "(offline, HF_HUB_OFFLINE=1, or an unknown name). Pass a local directory instead, "
            f"e.g. model={folder!r}: download it once on a connected machine with {download} "
            "(or save it there with save_pretrained).",
        )


class ModelReleasedError(RagRerankError):
    """The model was released (pool.release/clear) and cannot serve this call."""


class InferenceError(RagRerankError):
    """The backend failed while scoring or embedding; the model stays loaded."""


class OutOfMemoryError(InferenceError):
    """Out of memory although the batch was split down to a single item."""


class QueueFullError(RagRerankError):
    """Too many requests are waiting for this model (``EngineConfig.max_queue``).

    Back off and retry, add replicas, or raise ``max_queue`` / set ``queue_timeout_s``.
    """


class RequestTimeoutError(RagRerankError, TimeoutError):
    """The request did not finish within its timeout; it was withdrawn if still queued."""


class RemoteError(InferenceError):
    """A model server used through the remote backend failed the call.

    ``url`` is the endpoint, ``status`` the HTTP status (None when no answer came back).
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(message)


class RemoteUnavailableError(RemoteError):
    """The server could not be reached, or stayed overloaded (429) or failing (5xx) after every
    retry. Check that it is running, or add replicas / raise its concurrency limits."""


class RemoteTimeoutError(RemoteError):
    """The server accepted the request but did not answer within the timeout. Not retried (the
    work may still be running there); raise the ``timeout`` option or send smaller batches."""


class RemoteAuthError(RemoteError):
    """401/403: the server wants a bearer token that was not sent or is wrong."""


class RemoteRequestError(RemoteError):
    """The server rejected the request (a 4xx other than 401/403/429): too large, invalid, ..."""
