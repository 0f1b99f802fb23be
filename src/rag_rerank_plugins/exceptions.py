"""Every exception this package raises on purpose, in one tree.

Catch :class:`RagRerankError` to handle all of them::

    RagRerankError
    ├── ConfigurationError          (also a ValueError) a spec or adapter setting is invalid
    │   ├── UnknownBackendError     the backend name is not registered
    │   └── InvalidInputError       (also a TypeError) text, query or pairs it cannot accept
    ├── MissingDependencyError      (also an ImportError) an optional extra is not installed
    ├── ModelLoadError              loading failed; the next call retries the load
    │   └── ModelNotFoundError      the model is neither a local path nor reachable on the hub
    ├── ModelReleasedError          the model was released while a call still needed it
    └── InferenceError              the backend failed during a forward pass

Messages say what to do next, because they are read in a stack trace at 3 a.m.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InferenceError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelReleasedError",
    "RagRerankError",
    "UnknownBackendError",
]


class RagRerankError(Exception):
    """Base class of every error raised by rag-rerank-plugins."""


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
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'rag-rerank-plugins[{extra}]'"
        )


class ModelLoadError(RagRerankError):
    """Loading a model failed. Nothing is cached, so the next call tries again."""

    def __init__(self, model: str, backend: str, cause: BaseException | str) -> None:
        self.model = model
        self.backend = backend
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"Could not load model {model!r} with backend {backend!r}: {reason}")


class ModelNotFoundError(ModelLoadError):
    """The model is not a local directory and could not be fetched (offline or unknown name)."""

    def __init__(self, model: str, backend: str, cause: BaseException | str) -> None:
        super().__init__(model, backend, cause)
        self.args = (
            f"{self.args[0]}\nThe model was not found locally and the hub could not be reached "
            "(offline, HF_HUB_OFFLINE=1, or an unknown name). Pass a local directory instead, "
            "e.g. model='/models/bge-reranker-v2-m3' (a folder saved with save_pretrained), or "
            "download it once on a connected machine with `huggingface-cli download <name>`.",
        )


class ModelReleasedError(RagRerankError):
    """The model was released (pool.release/clear) and cannot serve this call."""


class InferenceError(RagRerankError):
    """The backend failed while scoring or embedding; the model stays loaded."""
