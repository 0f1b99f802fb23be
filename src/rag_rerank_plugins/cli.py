"""The ``rag-rerank`` console script: run the offline demo, or show what this install can do.

Importing this module must stay cheap (``rag-rerank --help`` should answer instantly and never
import torch), so every heavy import happens inside the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from ._config import ConfigModel

_Section = TypeVar("_Section", bound="ConfigModel")

__all__ = ["build_parser", "main"]

_EPILOG = """\
environment:
  HF_HUB_OFFLINE=1             never contact the Hugging Face hub (the demo sets it by default
                               when its models are packaged or local)
  RAG_RERANK_TORCH_THREADS=N   torch intra-op threads, set at the first model load (1 is often
                               faster on a small, busy machine)
"""


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {number}")
    return number


def _name(value: str) -> str:
    """A model or backend name: blank was silently the default before."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            f"expected a name, got {value!r}; leave it out for the default"
        )
    return value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tools and tests)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rag-rerank",
        description="Shared, load-once reranker and embedder handles for LangChain and LlamaIndex.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log loads and timings to stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="serve simulated requests through LangChain and LlamaIndex; show the pool stats",
        description="Build one vector store per framework, then serve simulated requests, each "
        "with freshly built reranker adapters, and show that every model loaded once. Runs "
        "offline with the packaged all-MiniLM-L6-v2. Needs the extras 'langchain,llama-index,"
        "offline'.",
    )
    demo.add_argument(
        "--requests",
        type=_positive_int,
        default=20,
        help="simulated requests to serve (default: 20)",
    )
    demo.add_argument(
        "--reranker",
        metavar="MODEL",
        type=_name,
        default=None,
        help="reranker name or local path (default: the packaged all-MiniLM-L6-v2 as a bi-encoder)",
    )
    demo.add_argument(
        "--backend",
        type=_name,
        default=None,
        help="reranker backend (default: 'cross-encoder' with --reranker, else 'bi-encoder')",
    )
    demo.add_argument(
        "--top-n",
        type=_positive_int,
        default=3,
        help="documents kept per request (default: 3)",
    )
    demo.set_defaults(handler=_cmd_demo)

    info = sub.add_parser(
        "info",
        help="show versions, devices, the dtype policy, backends, packaged and configured models",
        description="Show what this installation can do: versions, devices, the dtype the "
        "policy picks for device 'auto' (and why), registered backends, packaged models, the "
        "configured defaults (RAG_RERANK_* variables) and the models loaded in this process.",
    )
    info.set_defaults(handler=_cmd_info)
    _add_serve_parser(sub)
    return parser


_SERVE_DESCRIPTION = """\
Serve rerankers and embedders over HTTP from one shared pool (extra 'server'). Endpoints
(the server's protocol registry, rag_rerank_plugins.server.registry):

{endpoints}

Three deployment shapes, same adapters in all of them:
  1. in-process      no server: adapters load the model once per process (backend
                     'cross-encoder', 'sentence-transformers', ...). Best for one process.
  2. one per machine `rag-rerank serve` next to the app; every worker process, CLI run and
                     notebook uses backend='remote-reranker'/'remote-embedder' with
                     model='http://127.0.0.1:8080': one model in memory instead of one per
                     worker, and no cold start per script.
  3. a fleet         several `rag-rerank serve` replicas (or TEI / infinity servers) behind a
                     load balancer; clients point the remote backend at the balancer's URL and
                     retry 429/5xx with backoff. See docs/deployment.md.

Every flag can also be set with the environment variable its help names ([env ...]): most
are RAG_RERANK_<FLAG> (e.g. RAG_RERANK_PORT=9000); a repeatable flag's variable takes a list
(--reranker: RAG_RERANK_RERANKERS=a=/models/a,b=/models/b; --spec: RAG_RERANK_SPECS) and
--threads is RAG_RERANK_TORCH_THREADS. A flag wins over its variable. The bearer token is never
a flag's value, so it does not show up in the process list: --api-key-file or
RAG_RERANK_API_KEY_FILE names a file holding it, or RAG_RERANK_API_KEY holds it (not both).
"""


#: ``rag-rerank serve --help`` sections, in order; a field's group is its :class:`Cli` marker's,
#: else its section's ``cli_group``.
_SERVE_GROUPS = {
    "models": "what to serve, and how models are loaded",
    "server": "the HTTP server",
    "limits": "admission limits of the server",
    "engine": "the served pool's scheduler, batching, queues and caches",
    "pool": "the served pool's memory budget and idle unload",
}


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from .server.config import SERVE_SECTIONS
    from .server.registry import EndpointsHelpFormatter  # fills {endpoints} at --help only

    serve = sub.add_parser(
        "serve",
        help="serve the shared pool over HTTP (TEI/Cohere/infinity-compatible; extra 'server')",
        description=_SERVE_DESCRIPTION,
        formatter_class=EndpointsHelpFormatter,
    )
    groups = {title: serve.add_argument_group(title, text) for title, text in _SERVE_GROUPS.items()}
    for section, only in SERVE_SECTIONS:
        for name in only if only is not None else section.model_fields:
            _add_setting_option(serve, groups, section, name)
    serve.set_defaults(handler=_cmd_serve)


def _add_setting_option(
    parser: argparse.ArgumentParser,
    groups: dict[str, argparse._ArgumentGroup],
    section: type[ConfigModel],
    name: str,
) -> None:
    """One ``serve`` option built from a settings field: flag, type, help and default all come
    from the field, and the value is left out of the namespace unless given (so the variable,
    then the default, apply)."""
    from ._config import cli_of, flag_for, format_default

    info = section.model_fields[name]
    cli = cli_of(info)
    group_name = cli.group or section.cli_group
    if group_name not in groups:
        groups[group_name] = parser.add_argument_group(group_name)
    group = groups[group_name]
    flag = flag_for(section, name)
    var = section.env_prefix + name.upper()
    default = format_default(info.get_default(call_default_factory=True))
    kwargs: dict[str, Any] = {
        "dest": f"{section.__name__}.{name}",
        "default": argparse.SUPPRESS,
        "help": f"{info.description} [env {var}; default: {default}]".replace("%", "%%"),
    }
    annotation = info.annotation
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif cli.secret_file:
        kwargs.update(type=_secret_file(flag), metavar=cli.metavar)
    else:
        kwargs["type"] = _setting_parser(info, flag)
        if get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        else:
            kwargs["metavar"] = cli.metavar or _metavar(annotation)
        if cli.repeat:
            kwargs["action"] = "extend"  # each flag's text parses to a list: one flat list
    group.add_argument(flag, *cli.aliases, **kwargs)


def _metavar(annotation: Any) -> str:
    kinds = {arg for arg in (annotation, *get_args(annotation)) if arg is not type(None)}
    if int in kinds:
        return "N"
    if float in kinds:
        return "X"
    return "TEXT"


def _number(text: str, *, whole: bool) -> int | float:
    """A flag's number as its variable reads it: ASCII only (Python's ``int`` also reads
    "١٢", which the variable refuses), and a whole-number setting takes ``8`` or ``8.0``."""
    stripped = text.strip()
    if not stripped.isascii():
        raise ValueError("must be a number written with the digits 0-9")
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        number = float(stripped)
    except ValueError:  # Python's "could not convert string to float: ''" said nothing useful
        raise ValueError("must be a whole number" if whole else "must be a number") from None
    if not whole:
        return number
    if not number.is_integer():
        raise ValueError("must be a whole number")
    return int(number)


def _setting_parser(info: FieldInfo, flag: str) -> Callable[[str], Any]:
    """Text -> value with the same parser as the field's variable; numbers are checked here so
    ``--port http`` is a usage error at once (ranges are checked by the model)."""
    from ._config import parse_text

    kinds = {arg for arg in (info.annotation, *get_args(info.annotation))}

    def parse(text: str) -> Any:
        try:
            value = parse_text(info, text)
            if isinstance(value, str) and (int in kinds or float in kinds):
                return _number(value, whole=int in kinds and float not in kinds)
            return value
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: {exc}") from None

    parse.__name__ = flag
    return parse


def _secret_file(flag: str) -> Callable[[str], str]:
    """The value of a secret setting, read from the file the flag names (never from argv), by
    the reader of its variable (``RAG_RERANK_API_KEY_FILE``), so both refuse the same files."""

    def read(path: str) -> str:
        from .server.config import read_api_key_file

        try:
            return read_api_key_file(path, f"{flag} {path}")
        except ValueError as exc:  # ConfigurationError: a usage error, before anything starts
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = flag
    return read


def _given_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Section name -> {field: value} of the options given on the command line."""
    given: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, name = dest.partition(".")
        if not dot:
            continue
        given.setdefault(section, {})[name] = value
    return given


def _cmd_serve(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    import os

    from ._config import AdapterConfig, flag_for
    from .engine_config import EngineConfig, PoolConfig
    from .pool import ModelPool
    from .server.config import ServerConfig, check_api_key
    from .settings import warn_unknown_variables

    warn_unknown_variables()  # RAG_RERANK_MAX_QUEU=8 would otherwise serve the default silently
    given = _given_settings(args)

    def build(section: type[_Section]) -> _Section:
        return section.from_sources(
            None, given.get(section.__name__, {}), given_by=lambda name: flag_for(section, name)
        )

    config = build(ServerConfig)
    served = config.served_models()  # checked before anything starts
    config.check_semantic_cache_models()
    check_api_key(config.api_key)  # a blank RAG_RERANK_API_KEY: stop before anything starts
    # Only the torch threads of the adapters' section: building it whole from the environment
    # read RAG_RERANK_DEVICE & co. too, so a bad one failed serve although --device overrode it.
    threads_var = AdapterConfig.env_names()["torch_threads"]
    threads = AdapterConfig.from_sources(
        {threads_var: os.environ[threads_var]} if threads_var in os.environ else {},
        given.get(AdapterConfig.__name__, {}),
        given_by=lambda name: flag_for(AdapterConfig, name),
    ).torch_threads
    if threads is not None:
        os.environ["RAG_RERANK_TORCH_THREADS"] = str(threads)  # read at the first model load
    pool = ModelPool(config=build(EngineConfig), pool_config=build(PoolConfig))
    package_logger = logging.getLogger("rag_rerank_plugins")
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(config.log_level_number)  # 'trace' is no stdlib name
    from .server.run import serve

    names = ", ".join(m.name for m in served)
    host = f"[{config.host}]" if ":" in config.host else config.host  # an IPv6 address
    # Port 0 is chosen by the OS when uvicorn binds: uvicorn's "running on" line shows it.
    where = (
        f"http://{host}:{config.port}"
        if config.port
        else f"http://{host} on a free port chosen by the OS (uvicorn's log line shows which)"
    )
    out(f"rag-rerank serve: {where} serving {names}")
    return serve(config, pool=pool)


def _cmd_demo(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    from .demo import run_demo

    run_demo(
        requests=args.requests,
        reranker=args.reranker,
        backend=args.backend,
        top_n=args.top_n,
        out=out,
    )
    return 0


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _info_threads(row: Callable[[str, str], None]) -> None:
    """The thread policy of both runtimes, as models loaded now would get it."""
    from ._cpu import compute_threads, usable_cores
    from .engine_config import EngineConfig

    row("cpu cores usable", f"{usable_cores()} (affinity mask, SMT siblings once, cgroup quota)")
    try:
        workers, threads = EngineConfig.from_env().cpu_device_workers()
    except Exception as exc:  # a bad RAG_RERANK_* value must not hide the rest of `info`
        row("torch on cpu", f"cannot read the engine settings: {exc}")
    else:
        row(
            "torch on cpu",
            f"{workers} device worker(s) x {threads} intra-op thread(s) per model "
            "(RAG_RERANK_CPU_WORKERS, RAG_RERANK_TORCH_THREADS, OMP_NUM_THREADS)",
        )
    try:  # the backends' own parser: `info` never shows a value a load would refuse
        from .backends._onnx_common import env_threads

        ort_threads = env_threads()
    except Exception as exc:
        row("onnxruntime", f"invalid: {str(exc).rstrip('.')}: an ONNX model's load fails on it")
    else:
        shown = f"{ort_threads}" if ort_threads is not None else f"{compute_threads()}"
        row(
            "onnxruntime",
            f"{shown} intra-op thread(s) per session, 1 inter-op, spinning off "
            "(RAG_RERANK_ORT_THREADS or option intra_op_threads)",
        )
    try:
        row("openvino", _openvino_line())
    except Exception as exc:  # RAG_RERANK_CPU_BF16=maybe aborted `info` here
        row("openvino", f"cannot resolve dtype 'auto': {type(exc).__name__}: {exc}")


def _openvino_line() -> str:
    """What the OpenVINO backends would run here: version, the dtype 'auto' hint, INT8 support."""
    version = _version_of("openvino")
    if version is None:
        return "not installed (extra 'openvino'; backends openvino-cross-encoder/-embedder)"
    from .policy import decide_dtype

    decision = decide_dtype("auto", "cpu")
    hint = "BF16" if decision.dtype == "bfloat16" else "FP32"
    nncf = _version_of("nncf")
    int8 = f"nncf {nncf}" if nncf else "not installed (extra 'openvino')"
    return (
        f"{version}: dtype 'auto' = {hint} hint ({decision.reason}); quantize='int8' by NNCF: "
        f"{int8}; per model, stats()['kernels'] says what ran and whether the IR was cached"
    )


def _auto_line(settings: Any) -> str:
    """What ``backend="auto"`` resolves to here for the configured models, device and dtype."""
    from .backend_choice import choose_backend, cpu_kind

    try:
        picks = [
            f"{kind} -> "
            + choose_backend(kind, (), settings.device, settings.dtype, getattr(settings, field))
            for kind, field in (("reranker", "reranker_model"), ("embedder", "embedder_model"))
        ]
        return f"backend 'auto' ({cpu_kind()} CPU), for these: {', '.join(picks)}"
    except Exception as exc:  # a bad override (RAG_RERANK_CPU_KIND) should not break `info`
        return f"backend 'auto': cannot resolve: {type(exc).__name__}: {exc}"


def _cmd_info(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    """``rag-rerank info``: each unknown variable is one of its lines (:func:`_info_settings`),
    so the UserWarning every settings read repeats (the engine's settings, the pool) is not
    printed on top of it."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"RAG_RERANK_\w+ is not a setting", category=UserWarning
        )
        return _info_report(out)


def _info_report(out: Callable[[str], object]) -> int:
    """The lines of ``rag-rerank info``."""
    from . import __version__
    from .backends import available_backends
    from .offline import PACKAGED_MODELS, packaged_model_path
    from .policy import decide_dtype, resolve_device

    def row(label: str, value: str) -> None:
        out(f"{label:<22} {value}")

    row("rag-rerank-plugins", __version__)
    row("python", f"{platform.python_version()} ({sys.executable})")
    for dist in (
        "sentence-transformers",
        "transformers",
        "langchain-core",
        "llama-index-core",
    ):
        row(dist, _version_of(dist) or "not installed")

    if importlib.util.find_spec("torch") is None:
        row("torch", "not installed (extra 'st'); only torch-free backends work")
    else:
        try:
            import torch
        except Exception as exc:  # a broken torch install should not break `info`
            row("torch", f"fails to import: {type(exc).__name__}: {exc}")
        else:
            row("torch", f"{torch.__version__} ({torch.get_num_threads()} threads)")
            cuda = torch.cuda.is_available()
            count = torch.cuda.device_count() if cuda else 0
            row("cuda available", f"{cuda} ({count} device(s))")
            for index in range(count):
                row(f"  cuda:{index}", torch.cuda.get_device_name(index))
            mps = getattr(torch.backends, "mps", None)
            row("mps available", str(bool(mps is not None and mps.is_available())))

    try:
        device = resolve_device("auto")
        decision = decide_dtype("auto", device)
    except Exception as exc:  # a device, or the dtype (a bad RAG_RERANK_CPU_BF16)
        row("policy", f"cannot resolve the auto policy: {type(exc).__name__}: {exc}")
    else:
        row("device 'auto'", device)
        row(f"dtype 'auto' on {device}", f"{decision.dtype} ({decision.reason})")

    _info_threads(row)

    out("backends:")
    backends = available_backends()
    width = max(len(name) for name in backends)
    for name, backend in sorted(backends.items()):
        out(f"  {name:<{width}}  {backend.kind:<8}  {backend.description}")

    out("packaged models (extra 'offline'):")
    for name, (dist, _module) in PACKAGED_MODELS.items():
        path = packaged_model_path(name)
        where = path if path is not None else f"not installed (pip install {dist})"
        out(f"  {name}: {where}")

    out("configured defaults (RAG_RERANK_* variables):")
    _info_settings(out)
    # The process's pool is created by get_pool() from RAG_RERANK_* too: a bad value is a line.
    try:
        from .pool import get_pool

        loaded = get_pool().loaded_specs()
    except Exception as exc:
        out(f"models loaded in this process: unknown ({type(exc).__name__}: {exc})")
        return 0
    out(f"models loaded in this process: {len(loaded)}")
    for spec in loaded:
        out(f"  {spec.label}")
    return 0


def _section_problems() -> list[str]:
    """Each settings section's problem with the environment, read section by section (a
    section reports its variables by name, e.g. RAG_RERANK_TORCH_THREADS)."""
    from .settings import SECTIONS

    problems: list[str] = []
    for section in SECTIONS:
        try:
            section.from_env()  # type: ignore[attr-defined]
        except Exception as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    return problems


def _info_settings(out: Callable[[str], object]) -> None:
    """The configured defaults, each problem (an invalid or unknown variable) as a line: `info`
    is where an operator looks for what is wrong, so it never stops at the first problem."""
    try:
        from .settings import describe_unknown, get_settings, unknown_variables
    except ImportError as exc:  # pydantic-settings missing: say so, the rest still works
        out(f"  unavailable: {exc}")
        return
    for var, suggestion in unknown_variables().items():
        out(f"  warning: {describe_unknown(var, suggestion)}")
    from ._config import AdapterConfig

    engine: Any = None
    try:
        with warnings.catch_warnings():  # reported just above, as lines
            warnings.simplefilter("ignore", UserWarning)
            settings: Any = get_settings()
        engine = settings.engine
    except Exception as exc:  # RAG_RERANK_MAX_QUEUE=0 aborted `info` here
        # Settings stops at its first bad section: each section's own problem, one line each.
        problems = _section_problems() or [str(exc)]
        for problem in problems:
            out(f"  invalid: {problem}")
        try:  # the adapters' own defaults, when another section is the bad one
            settings = AdapterConfig.from_env()
        except Exception:
            from .backend_choice import cpu_kind

            try:  # still check the CPU-kind override, which the auto line would show
                cpu_kind()
            except Exception as kind_exc:
                out(f"  invalid: {kind_exc}")
            return
    out(f"  reranker  {settings.reranker_model} (backend {settings.reranker_backend})")
    out(f"  embedder  {settings.embedder_model} (backend {settings.embedder_backend})")
    out(f"  device {settings.device}, dtype {settings.dtype}, batch_size {settings.batch_size}")
    out(f"  {_auto_line(settings)}")
    if engine is not None:
        out(f"  engine    {engine}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rag-rerank``. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    if args.verbose:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    def out(line: str) -> None:
        try:
            print(line, flush=True)
        except BrokenPipeError:  # `rag-rerank info | head`: the reader left
            raise _StdoutClosed from None

    from .exceptions import RagRerankError

    try:
        code: int = args.handler(args, out)
    except RagRerankError as exc:
        print(f"rag-rerank: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _StdoutClosed:  # no traceback; other BrokenPipeErrors are real errors
        _silence_stdout()
        return 1
    return code


class _StdoutClosed(Exception):
    """Standard output's reader went away (a closed pipe) while a command printed."""


def _silence_stdout() -> None:
    """Point the stdout file descriptor at devnull: Python flushes stdout again at exit, and that
    flush would raise a second BrokenPipeError. Only when stdout is a real file descriptor."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a StringIO, or closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
