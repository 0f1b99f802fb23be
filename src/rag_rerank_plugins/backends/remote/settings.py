"""The remote options of one spec, parsed and checked once at load time (:class:`RemoteSettings`).

Everything a remote model needs to know about its server comes from the spec's options (plain
values, so the spec stays a hashable pool key): where the server is, which wire protocol it
speaks (a name in the protocol registry, :mod:`.protocols`), timeouts, the retry budget, the
largest request body. A bad option is a :class:`ConfigurationError` here, before anything is
sent; nothing in this module touches the network or imports httpx.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ...exceptions import ConfigurationError
from ..options import REMOTE_OPTIONS
from .protocols import PROTOCOLS, get_protocol

if TYPE_CHECKING:
    from ...spec import ModelSpec

__all__ = ["MIN_REQUEST_BYTES", "REMOTE_OPTIONS", "RemoteSettings"]

#: What a remote backend sends: the operation whose request must carry ``truncate=False``.
_OPERATIONS = {"remote-reranker": "rerank", "remote-embedder": "embed"}
#: The smallest ``max_request_bytes`` option accepted.
MIN_REQUEST_BYTES = 1024
#: Option names that look like a secret: refused, since a spec's label shows up in stats,
#: metrics and logs.
_SECRET_OPTIONS = ("api_key", "token", "bearer", "password", "authorization")


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteSettings:
    """The remote options of one spec, validated once at load time."""

    base_url: str
    model_name: str | None
    protocol: str
    timeout: float = 30.0
    connect_timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    api_key_env: str | None = None
    truncate: bool = True
    #: Which end of a too-long input the server drops: "right" (the usual) or "left".
    truncation_direction: str = "right"
    query_prompt_name: str | None = None
    max_connections: int = 32
    verify: bool = True
    max_request_bytes: int | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, operation: str | None = None) -> RemoteSettings:
        """The settings of ``spec``; ``operation`` (``"rerank"`` or ``"embed"``; default: from
        the spec's backend) is what the model will send, for the checks that depend on it."""
        options = spec.options_dict
        _refuse_secrets(options)
        if spec.max_length is not None:
            raise ConfigurationError(
                "max_length cannot be set on a remote spec: the server fixes it when it loads "
                "the model. Set it there (e.g. `rag-rerank serve --max-length N`)."
            )
        base_url, model_name = _url_and_model_name(spec, options)
        protocol = str(options.get("protocol", "tei")).lower()
        if get_protocol(protocol).needs_model_name and not model_name:
            raise ConfigurationError(
                f"Protocol {protocol!r} sends a model name with every request: pass the option "
                "model_name='...' (or use the model name as the spec's model and url=...)."
            )
        api_key_env = options.get("api_key_env")
        if api_key_env is not None and not os.environ.get(str(api_key_env)):
            raise ConfigurationError(
                f"Option api_key_env={api_key_env!r} names an environment variable that is not "
                f"set. Export the server's token first: export {api_key_env}=..."
            )
        try:
            settings = cls(
                base_url=base_url.rstrip("/"),
                model_name=str(model_name) if model_name else None,
                protocol=protocol,
                timeout=float(options.get("timeout", 30.0)),
                connect_timeout=float(options.get("connect_timeout", 5.0)),
                retries=int(options.get("retries", 3)),
                backoff=float(options.get("backoff", 0.25)),
                max_backoff=float(options.get("max_backoff", 8.0)),
                api_key_env=str(api_key_env) if api_key_env is not None else None,
                truncate=_flag(options, "truncate", True),
                truncation_direction=str(options.get("truncation_direction", "right")).lower(),
                query_prompt_name=options.get("query_prompt_name"),
                max_connections=int(options.get("max_connections", 32)),
                verify=_flag(options, "verify", True),
                max_request_bytes=(
                    int(options["max_request_bytes"])
                    if options.get("max_request_bytes") is not None
                    else None
                ),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"Invalid remote backend option: {exc}") from None
        settings._check_ranges()
        settings._check_truncate(operation or _OPERATIONS.get(spec.backend))
        return settings

    def _check_truncate(self, operation: str | None) -> None:
        """``truncate=False`` asks for an error instead of a cut: refused where the protocol's
        request cannot carry it (the server would cut the text and say nothing)."""
        if self.truncate or operation is None:
            return
        if operation in get_protocol(self.protocol).honours_no_truncate:
            return
        honoured = ", ".join(
            f"{name!r}" for name, p in PROTOCOLS.items() if operation in p.honours_no_truncate
        )
        raise ConfigurationError(
            f"truncate=False cannot be honoured by protocol={self.protocol!r} for {operation}: "
            "its request has no field asking the server not to cut a too-long text, so the "
            "server would cut it silently. Leave truncate=True (the default), or use a protocol "
            f"that honours truncate=False for {operation} ({honoured or 'none registered'})."
        )

    def _check_ranges(self) -> None:
        # ``not x > 0``, not ``x <= 0``: NaN ("nan" in a JSON spec or a variable) compares
        # false both ways, and would pass here only to fail every request later.
        if not (0 < self.timeout < math.inf and 0 < self.connect_timeout < math.inf):
            raise ConfigurationError(
                "Remote timeouts must be positive, finite numbers of seconds, got "
                f"timeout={self.timeout!r}, connect_timeout={self.connect_timeout!r}."
            )
        # max_backoff may be inf (no cap on a server's Retry-After); backoff may not.
        if not (self.retries >= 0 and 0 <= self.backoff < math.inf and self.max_backoff >= 0):
            raise ConfigurationError(
                "retries, backoff and max_backoff must be numbers, not negative (and backoff "
                "finite); got "
                f"retries={self.retries!r}, backoff={self.backoff!r}, "
                f"max_backoff={self.max_backoff!r}."
            )
        if self.truncation_direction not in ("right", "left"):
            raise ConfigurationError(
                "truncation_direction must be 'right' (drop the end of a too-long text) or "
                f"'left' (drop its start), got {self.truncation_direction!r}."
            )
        if self.max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1.")
        if self.max_request_bytes is not None and self.max_request_bytes < MIN_REQUEST_BYTES:
            raise ConfigurationError(
                f"max_request_bytes must be at least {MIN_REQUEST_BYTES} (bytes of one request "
                f"body), got {self.max_request_bytes}."
            )


def _refuse_secrets(options: dict[str, Any]) -> None:
    for key in options:
        if key.lower() in _SECRET_OPTIONS:
            raise ConfigurationError(
                f"Do not put secrets in a spec (option {key!r}): specs are shown in stats, "
                "metrics and logs. Export the token in an environment variable and name it "
                "with the option api_key_env='MY_TOKEN_VAR'."
            )


def _refuse_url_secrets(url: Any) -> None:
    """A URL with ``user:password@`` or a query string is refused, without echoing it.

    Credentials in the URL would sit in the spec's label (stats, metrics, logs) and in every
    error message naming the endpoint; and the client appends each route to the base URL, so a
    query string (``?api_key=...``) would end up in the middle of the path.
    """
    if not isinstance(url, str) or not is_url(url):
        return
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigurationError(
            "Do not put credentials in the server URL (user:password@host): specs are shown in "
            "stats, metrics and logs, and the URL in every error. Give the URL without them, "
            "export the token in an environment variable and name it with the option "
            "api_key_env='MY_TOKEN_VAR' (sent as a bearer token)."
        )
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        raise ConfigurationError(
            "The server URL must not have a query string or fragment ('?...' / '#...'): the "
            "client appends each route (/rerank, /embed, ...) to it. Give the base URL, e.g. "
            "'http://host:8080' or 'http://host:8080/prefix'; put a token in an environment "
            "variable named by the option api_key_env."
        )


def _url_and_model_name(spec: ModelSpec, options: dict[str, Any]) -> tuple[str, Any]:
    """The server's URL and the model name to send: the spec's model is one or the other."""
    _refuse_url_secrets(spec.model)
    _refuse_url_secrets(options.get("url"))
    if is_url(spec.model):
        if options.get("url") not in (None, spec.model):
            raise ConfigurationError(
                f"The spec names two URLs ({spec.model!r} and url={options['url']!r}); "
                "give the URL once, as the model or as the url option."
            )
        return spec.model, options.get("model_name")
    base_url = options.get("url")
    if not isinstance(base_url, str) or not is_url(base_url):
        raise ConfigurationError(
            f"The remote backend needs the server's URL: use model='http://host:port' or "
            f"keep model={spec.model!r} and pass the option url='http://host:port' "
            f"(got url={base_url!r})."
        )
    return base_url, options.get("model_name", spec.model)


_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def _flag(options: Any, name: str, default: bool) -> bool:
    """A yes/no option as given in Python or as text (JSON specs, environment variables):
    ``bool("false")`` would be True, turning ``truncate="false"`` into a silent cut."""
    value = options.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"Option {name} must be true or false, got {value!r}.")
