"""The ``rag-rerank`` console script: run the offline demo, or show what this install can do.

Importing this module must stay cheap (``rag-rerank --help`` should answer instantly and never
import torch), so every heavy import happens inside the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import sys
from collections.abc import Callable, Sequence

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
        "offline with the packaged all-MiniLM-L6-v2 (extra 'offline').",
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
        default=None,
        help="reranker name or local path (default: the packaged all-MiniLM-L6-v2 as a bi-encoder)",
    )
    demo.add_argument(
        "--backend",
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

Every flag can also be set with an environment variable RAG_RERANK_<FLAG> (e.g.
RAG_RERANK_PORT=9000, RAG_RERANK_RERANKERS=a=/models/a,b=/models/b); a flag wins over its
variable. The bearer token comes only from RAG_RERANK_API_KEY or --api-key-file, never from a
flag, so it does not show up in the process list.
"""


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from .server.registry import EndpointsHelpFormatter  # fills {endpoints} at --help only

    serve = sub.add_parser(
        "serve",
        help="serve the shared pool over HTTP (TEI/Cohere/infinity-compatible; extra 'server')",
        description=_SERVE_DESCRIPTION,
        formatter_class=EndpointsHelpFormatter,
    )
    models = serve.add_argument_group("models")
    models.add_argument(
        "--reranker",
        dest="rerankers",
        action="append",
        metavar="[NAME=]MODEL",
        help="reranker to serve: hub name or local path, optionally named (repeatable)",
    )
    models.add_argument(
        "--embedder",
        dest="embedders",
        action="append",
        metavar="[NAME=]MODEL",
        help="embedder to serve: hub name or local path, optionally named (repeatable)",
    )
    models.add_argument(
        "--spec",
        dest="specs",
        action="append",
        metavar="JSON",
        help='any spec as JSON, e.g. \'{"name": "r", "model": "m", "backend": "cross-encoder", '
        '"options": {"revision": "v2"}}\' (repeatable)',
    )
    models.add_argument("--reranker-backend", help="backend for --reranker (cross-encoder)")
    models.add_argument("--embedder-backend", help="backend for --embedder (sentence-transformers)")
    models.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (auto)")
    models.add_argument("--dtype", help="auto, float32, float16 or bfloat16 (auto)")
    models.add_argument("--max-length", type=_positive_int, help="token limit (model's own)")
    models.add_argument(
        "--threads", type=_positive_int, help="torch intra-op threads (RAG_RERANK_TORCH_THREADS)"
    )
    net = serve.add_argument_group("server")
    net.add_argument("--host", help="address to bind (127.0.0.1; 0.0.0.0 in a container)")
    net.add_argument("--port", type=int, help="port (8080)")
    net.add_argument("--api-key-file", metavar="PATH", help="file holding the bearer token")
    net.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="skip the warm-up forward pass before /health turns ready",
    )
    net.add_argument(
        "--graceful-timeout",
        type=float,
        help="seconds a shutdown waits for in-flight requests (30)",
    )
    net.add_argument("--log-level", help="uvicorn log level (info)")
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-concurrency", type=_positive_int, help="model calls running at once (4)"
    )
    limits.add_argument(
        "--max-pending", type=int, help="requests waiting beyond that; more get 429 (32)"
    )
    limits.add_argument(
        "--max-client-batch", type=_positive_int, help="texts per request; more get 413 (256)"
    )
    limits.add_argument(
        "--max-request-bytes", type=_positive_int, help="body size; larger get 413 (2 MiB)"
    )
    limits.add_argument("--batch-size", type=_positive_int, help="texts per forward pass (32)")
    limits.add_argument(
        "--retry-after", type=_positive_int, help="Retry-After seconds on 429 (estimated)"
    )
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace, out: Callable[[str], object]) -> int:
    import json
    import os

    from .exceptions import ConfigurationError
    from .server.config import ServerConfig

    specs = None
    if args.specs:
        try:
            specs = [json.loads(text) for text in args.specs]
        except ValueError as exc:
            raise ConfigurationError(f"--spec must be JSON: {exc}") from None
    api_key = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as fh:
                api_key = fh.read().strip()
        except OSError as exc:
            raise ConfigurationError(f"Cannot read --api-key-file: {exc}") from None
        if not api_key:
            raise ConfigurationError(f"--api-key-file {args.api_key_file} is empty.")
    config = ServerConfig.from_env(
        host=args.host,
        port=args.port,
        rerankers=args.rerankers,
        embedders=args.embedders,
        specs=specs,
        reranker_backend=args.reranker_backend,
        embedder_backend=args.embedder_backend,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        max_concurrency=args.max_concurrency,
        max_pending=args.max_pending,
        max_client_batch=args.max_client_batch,
        max_request_bytes=args.max_request_bytes,
        batch_size=args.batch_size,
        api_key=api_key,
        warmup=args.warmup,
        graceful_timeout=args.graceful_timeout,
        retry_after=args.retry_after,
        log_level=args.log_level,
    )
    if args.threads:
        os.environ["RAG_RERANK_TORCH_THREADS"] = str(args.threads)
    package_logger = logging.getLogger("rag_rerank_plugins")
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(config.log_level.upper())
    from .server.run import serve

    names = ", ".join(m.name for m in config.served_models())
    out(f"rag-rerank serve: http://{config.host}:{config.port} serving {names}")
    return serve(config)


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


def _cmd_info(args: argparse.Namespace, out: Callable[[str], object]) -> int:
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
    except Exception as exc:
        row("policy", f"cannot resolve device 'auto': {type(exc).__name__}: {exc}")
    else:
        row("device 'auto'", device)
        row(f"dtype 'auto' on {device}", f"{decision.dtype} ({decision.reason})")

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
    try:
        from .settings import get_settings

        settings = get_settings()
        out(f"  reranker  {settings.reranker_model} (backend {settings.reranker_backend})")
        out(f"  embedder  {settings.embedder_model} (backend {settings.embedder_backend})")
        out(f"  device {settings.device}, dtype {settings.dtype}, batch_size {settings.batch_size}")
        out(f"  engine    {settings.engine}")
    except ImportError as exc:  # pydantic-settings missing: say so, the rest still works
        out(f"  unavailable: {exc}")
    from .pool import get_pool

    loaded = get_pool().loaded_specs()
    out(f"models loaded in this process: {len(loaded)}")
    for spec in loaded:
        out(f"  {spec.label}")
    return 0


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
        print(line, flush=True)

    from .exceptions import RagRerankError

    try:
        code: int = args.handler(args, out)
    except RagRerankError as exc:
        print(f"rag-rerank: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
