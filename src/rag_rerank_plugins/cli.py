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
        help="show versions, devices, the dtype policy, backends and packaged models",
        description="Show what this installation can do: versions, devices, the dtype the "
        "policy picks for device 'auto' (and why), registered backends and packaged models.",
    )
    info.set_defaults(handler=_cmd_info)
    return parser


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
