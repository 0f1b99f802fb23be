"""What the ONNX Runtime backends share: the export cache, the thread policy, sessions, tokenizers.

``onnx.py`` (cross-encoder) and ``onnx_embedder.py`` (sentence-transformers embedder) differ only
in what they export and how they turn the graph's outputs into results; everything else lives
here so the two can never drift apart:

* **The export cache.** One entry per (model files, mode, opset, format version, extra key) under
  ``RAG_RERANK_ONNX_CACHE`` or option ``cache_dir`` (default ``~/.cache/rag-rerank-plugins/onnx``).
  :func:`model_fingerprint` hashes every file of the model folder (path, size and mtime, or for a
  link into a Hugging Face hub cache the blob's name, its content hash; the full contents of files
  under 4 MiB), so a changed model exports again and an unchanged one is reused by every later
  process. Entries are written in a scratch folder (:func:`tmp_entry`, :func:`scratch_dir`: the
  permissions of a plain ``mkdir``, so other users can read the cache) and renamed into place
  (:func:`publish`): concurrent processes never see half an export, and only one of them exports
  it (:mod:`._build_lock`: the others wait, then load it). The scratch folders of a
  process killed mid-export are swept by the next export into that folder
  (:func:`sweep_scratch`). ``meta.json`` records the sha256 of the entry's other files, checked
  at every load (:func:`entry_damage`): a damaged entry is logged, removed and exported again,
  never served. A cache folder that cannot be
  written fails naming the folder and the way out (:func:`writable`); one holding the model's
  intact export is only read. A model path that does not exist and is no hub name raises
  :class:`ModelNotFoundError` (:func:`model_dir`).
* **Threads** (:func:`threads_for`): option ``intra_op_threads``, else ``RAG_RERANK_ORT_THREADS``,
  else the physical cores this process may use; one inter-op thread; spinning off, so an idle
  model does not burn the cores of a shared box (:func:`open_session`).
* **Sessions** (:class:`OnnxRuntimeModel`): the onnxruntime session is opened on first use. The
  ONNX backends' loads open it at once (:func:`cached_entry`: a broken export fails the load);
  the OpenVINO backends load their ONNX twin under :func:`deferred_sessions` and replace the
  session before it was ever opened, so a cached IR never builds an onnxruntime session.
* **Checks every ONNX backend makes at load** (:func:`check_cpu_float32`): CPU only, float32 or
  int8 (onnxruntime's CPU provider has no fast FP16/BF16 matmuls on x86).
* **Tokenizers** (:func:`configure_tokenizer`): the exported ``tokenizer.json`` run by
  ``tokenizers`` with the truncation and padding the export recorded, so loading a cached entry
  never imports torch or transformers (the cross-encoder's long-document windows import
  transformers' tokenizer on first use); each batch is then padded to its bucket length
  (:mod:`rag_rerank_plugins._shapes`), so sessions see a small fixed set of shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .._cpu import compute_threads
from .._forksafe import ForkSafeLock
from ..exceptions import (
    ConfigurationError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
)
from ._build_lock import build_lock
from ._common import QUANTIZE_MODES, quantize_mode
from ._torch_common import (
    building,
    import_optional,
    loading_errors,
    model_kwargs_for,
    steady_default_dtype,
    warn_past_positions,
)
from .options import ST_LOADING

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "CACHE_ENV",
    "DEFAULT_OPSET",
    "QUANTIZE_MODES",
    "THREADS_ENV",
    "cache_dir_of",
    "cached_entry",
    "check_cpu_float32",
    "configure_tokenizer",
    "default_cache_dir",
    "default_threads",
    "deferred_sessions",
    "discard_entry",
    "entry_damage",
    "env_threads",
    "file_sha256",
    "is_graph_file",
    "entry_hashes",
    "entry_bytes",
    "entry_key",
    "export_count",
    "export_graph",
    "fast_tokenizer_json",
    "hub_blob",
    "model_dir",
    "model_fingerprint",
    "mode_of",
    "note_export",
    "OnnxRuntimeModel",
    "open_session",
    "opset_of",
    "publish",
    "publish_export",
    "quantize_int8",
    "scratch_dir",
    "sweep_scratch",
    "st_for_export",
    "threads_for",
    "tmp_entry",
    "tokenizer_meta",
    "writable",
]

logger = logging.getLogger(__name__)

#: Environment variable: where exports are cached (option ``cache_dir`` wins).
CACHE_ENV = "RAG_RERANK_ONNX_CACHE"
#: Environment variable: onnxruntime intra-op threads (option ``intra_op_threads`` wins).
THREADS_ENV = "RAG_RERANK_ORT_THREADS"
DEFAULT_OPSET = 17
#: Files under this size are hashed by content; larger ones (weights) by size and mtime (or, in
#: a Hugging Face hub cache, by their blob's name).
_HASH_CONTENT_BELOW = 4 * 1024 * 1024
#: A hub cache blob's file name: the sha256 of an LFS file, the git sha1 of any other.
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

_exports = 0
_exports_lock = ForkSafeLock()


def export_count() -> int:
    """How many exports this process has run, every ONNX backend together (a cached entry
    reused does not count)."""
    return _exports


def note_export() -> None:
    """Count one finished export (tests and logs tell a reuse from a re-export by it)."""
    global _exports
    with _exports_lock:
        _exports += 1


# -- threads ----------------------------------------------------------------------------------


def default_threads() -> int:
    """Physical cores this process may run on (affinity mask, SMT siblings once, cgroup quota),
    capped by ``OMP_NUM_THREADS`` when set, as the torch path is (:func:`.._cpu.compute_threads`):
    more intra-op threads than cores only adds contention."""
    return compute_threads()


def _positive_threads(value: Any, source: str) -> int:
    """``value`` as a thread count, or a :class:`ConfigurationError` naming ``source``."""
    bad = ConfigurationError(f"{source} must be a positive integer, got {value!r}.")
    # int(1.5) is 1 and int(True) is 1: a fraction or a bool is refused, not truncated.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise bad
    try:
        threads = int(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if threads <= 0:
        raise bad
    return threads


def env_threads() -> int | None:
    """The intra-op threads ``RAG_RERANK_ORT_THREADS`` asks for; None when it is unset, empty
    or blank (a blank variable counts as unset, as every ``RAG_RERANK_*`` setting's does).
    The one parser of that variable: the sessions and ``rag-rerank info`` both read it here,
    so ``info`` never shows a value a load would refuse."""
    value = os.environ.get(THREADS_ENV, "")
    if not value.strip():
        return None
    return _positive_threads(value, THREADS_ENV)


def threads_for(spec: ModelSpec) -> int:
    """Intra-op threads: option ``intra_op_threads``, else the environment (:func:`env_threads`),
    else :func:`default_threads`."""
    value = spec.option("intra_op_threads")
    if value is not None:
        return _positive_threads(value, "intra_op_threads")
    threads = env_threads()
    return threads if threads is not None else default_threads()


def open_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session with this package's thread policy (see the module docstring)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spinning: a model between requests costs no CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- options every ONNX backend checks --------------------------------------------------------


def check_cpu_float32(spec: ModelSpec, fallback: str) -> None:
    """Refuse what onnxruntime's CPU provider cannot do well, before anything is exported.

    ``fallback`` names the torch backend to use instead (in the messages). The extras are
    checked first, so a missing onnxruntime is reported as such whatever else is wrong.
    """
    import_optional("onnxruntime", "onnxruntime", "onnx", f"The {spec.backend!r} backend")
    import_optional("tokenizers", "tokenizers", "onnx", f"The {spec.backend!r} backend")
    if spec.device != "cpu":
        raise ConfigurationError(
            f"The {spec.backend!r} backend runs on the CPU (onnxruntime's CPU provider); "
            f"device={spec.device!r} was requested. Use device='cpu' or 'auto', or "
            f"backend={fallback!r} on a GPU."
        )
    if spec.dtype != "float32":
        raise ConfigurationError(
            f"dtype={spec.dtype!r}: onnxruntime's CPU provider has no fast FP16/BF16 matmuls "
            "on x86, so the ONNX backends run float32 (dtype='float32' or 'auto'), or int8 with "
            "model_kwargs={'quantize': 'int8'}."
        )


def mode_of(spec: ModelSpec) -> str:
    """``"float32"`` or a member of :data:`QUANTIZE_MODES`, from option ``quantize``."""
    return quantize_mode(spec.option("quantize")) or "float32"


def opset_of(spec: ModelSpec) -> int:
    """Option ``opset`` (default 17), checked: the exporter supports 14 to 21."""
    opset = spec.option("opset", DEFAULT_OPSET)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
        raise ConfigurationError(f"opset must be an int from 14 to 21, got {opset!r}.")
    return opset


# -- the export cache -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-rerank-plugins" / "onnx"


def cache_dir_of(spec: ModelSpec) -> Path:
    """Option ``cache_dir`` (a path), else :func:`default_cache_dir`. Any other value (a number,
    a bool) is refused naming the option; it failed as a bare ``TypeError: expected str, bytes
    or os.PathLike object``."""
    value = spec.option("cache_dir")
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(
            f"cache_dir must be a folder path (str or os.PathLike), got {value!r}; or leave it "
            f"out to use {CACHE_ENV} or ~/.cache/rag-rerank-plugins/onnx."
        )
    return Path(value or default_cache_dir()).expanduser()


def hub_blob(path: Path) -> str | None:
    """The blob name of a file that is a link into a Hugging Face hub cache
    (``snapshots/<rev>/<file> -> ../../blobs/<hash>``): the hash of its contents. None for any
    other file."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return target.name
    return None


def model_fingerprint(model_dir: Path, skip: Path | None = None) -> str:
    """sha256 over the model folder's files: relative path and size of each, the contents of the
    small ones (config, tokenizer), and for the large ones (weights) the hub blob's name when the
    file links into a Hugging Face hub cache (:func:`hub_blob`: a content hash, so a new revision
    is always a new key), else the mtime. Hidden folders (.git, .cache) are skipped.

    Known limit: a plain weights file replaced by one of the same size with its mtime kept
    (``cp -p``, ``rsync -a``, builds that pin mtimes) keeps its key, and the old export is served
    (hashing every weights file at every load would cost seconds for large models). ``touch`` the
    file, or delete the entry, to force a new export.

    ``skip``: a folder left out (the export cache, when a user puts it inside the model folder:
    hashing its own entries gave every export a new key, so nothing was ever reused)."""
    digest = hashlib.sha256()
    skipped: tuple[str, ...] | None = None  # ``skip`` relative to the model folder, if inside
    if skip is not None:
        with contextlib.suppress(ValueError):
            skipped = skip.resolve().relative_to(model_dir.resolve()).parts or None

    def counted(path: Path) -> bool:
        parts = path.relative_to(model_dir).parts
        if any(part.startswith(".") for part in parts):
            return False
        return skipped is None or parts[: len(skipped)] != skipped

    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and counted(p))
    for path in files:
        stat = path.stat()  # follows hub-cache symlinks to the blob
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{stat.st_size}\0".encode())
        if stat.st_size < _HASH_CONTENT_BELOW:
            digest.update(path.read_bytes())
        elif blob := hub_blob(path):
            digest.update(f"blob:{blob}".encode())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def offline(spec: ModelSpec) -> bool:
    """Whether hub files may only come from the local cache: option ``local_files_only`` or
    ``HF_HUB_OFFLINE`` (read now, not when huggingface_hub was imported)."""
    return bool(spec.option("local_files_only", False)) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes")


def model_dir(spec: ModelSpec) -> Path:
    """The local folder holding the model's files (a hub name: its snapshot).

    A name that is neither an existing path nor a valid hub name (``/models/typo``, ``./x``,
    ``~/x``: ``~`` is not expanded, as for the torch backends) raises
    :class:`ModelNotFoundError`, as the torch backends do, rather than the hub's
    "Repo id must be ..." validation error."""
    if spec.is_local_path:
        path = Path(spec.model).resolve()
        return path if path.is_dir() else path.parent
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec.model)
    except HFValidationError:
        hint = ""
        if spec.model.startswith("~") and os.path.exists(os.path.expanduser(spec.model)):
            hint = f" ('~' is not expanded: pass {os.path.expanduser(spec.model)!r})"
        raise ModelNotFoundError(
            spec.model,
            spec.backend,
            FileNotFoundError(
                f"Path {spec.model} not found: no such local folder or file{hint}, and not a "
                "Hugging Face hub name"
            ),
        ) from None

    return Path(
        snapshot_download(
            spec.model,
            revision=spec.option("revision"),
            cache_dir=spec.option("cache_folder"),
            local_files_only=offline(spec),
            # What sentence-transformers reads (module configs live in subfolders as *.json);
            # a repo's onnx/, openvino/ or .bin duplicates stay remote.
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
        )
    )


def entry_key(fingerprint: str, mode: str, opset: int, *, format_version: int, **extra: str) -> str:
    """The cache entry's name. ``extra`` separates backends exporting the same folder (the
    cross-encoder passes none, so its keys are those of every earlier release)."""
    payload = json.dumps(
        {"format": format_version, "model": fingerprint, "mode": mode, "opset": opset, **extra},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished entry into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (the ONNX and OpenVINO caches' integrity check)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_hashes(entry: Path) -> dict[str, str]:
    """sha256 of every file of an entry but ``meta.json`` (which records them)."""
    return {
        f.name: file_sha256(f)
        for f in sorted(entry.iterdir())
        if f.is_file() and f.name != "meta.json"
    }


def is_graph_file(name: str) -> bool:
    """The ONNX graph and its external weights (what onnxruntime or OpenVINO's converter reads)."""
    return name.endswith((".onnx", ".onnx_data", ".data"))


def entry_damage(entry: Path, *, graph: bool = True) -> str | None:
    """Why the published entry ``entry`` must not be served (``"missing"`` when there is none),
    or None when it is intact: its ``meta.json`` is readable and every file it recorded a sha256
    of (entries of earlier releases recorded none) still has it. A truncated or changed
    ``model.onnx`` either failed every load until the folder was deleted by hand, or, when
    onnxruntime could still open it, was served with other weights.

    ``graph=False`` leaves the graph files out (:func:`is_graph_file`): a load under
    :func:`deferred_sessions` (OpenVINO's, whose verified IR is what runs) reads only the
    tokenizer and meta, and must neither hash a 2 GB graph it never opens nor export again (with
    torch) because of it. The converter checks the graph before it reads it."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no meta.json" if entry.exists() else "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    if not isinstance(meta, dict) or not {"mode", "max_length"} <= set(meta):
        return f"meta.json is not an export's: {str(meta)[:80]}"
    hashes = meta.get("sha256", {})
    if not isinstance(hashes, dict):
        return f"meta.json records no file hashes: {str(hashes)[:80]}"
    for name, want in hashes.items():
        if not graph and is_graph_file(str(name)):
            continue
        try:
            got = file_sha256(entry / str(name))
        except OSError:
            got = "missing"
        if got != want:
            return f"{name}: sha256 {got[:12]}, recorded {str(want)[:12]}"
    return None


def discard_entry(entry: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no process sees it half deleted),
    then delete it."""
    if not entry.exists():
        return
    trash = scratch_dir(entry.parent, f".broken-{entry.name}-")
    with contextlib.suppress(OSError):  # another process moved or replaced it first
        entry.rename(trash / entry.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def writable(spec: ModelSpec, folder: Path, doing: str) -> Iterator[None]:
    """An OSError writing the cache (a read-only folder or file system, a full disk) as a
    ModelLoadError that names the folder and the way out, not a bare ``[Errno 30] Read-only file
    system: '.../.tmp-...'`` from deep in the export. A cache holding this model's intact export
    loads read-only: nothing is written then."""
    try:
        yield
    except OSError as exc:
        raise ModelLoadError(
            spec.model,
            spec.backend,
            f"cannot {doing} in the cache folder {str(folder)!r} "
            f"({type(exc).__name__}: {exc}). Make it writable (and free some space), or point "
            f"option cache_dir or {CACHE_ENV} at a writable folder; a folder that already "
            "holds this model's export is only read.",
        ) from exc


def _process_tag() -> str:
    """This host and PID namespace, hashed: two processes with equal tags see the same PIDs, so
    one can tell whether the other is still alive (containers sharing a cache volume, or hosts
    sharing it over NFS, get other tags, and their folders are never judged from here)."""
    where = socket.gethostname()
    with contextlib.suppress(OSError):
        where += os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(where.encode()).hexdigest()[:8]


#: ``<prefix><tag>-<pid>-<random>``: the scratch folders :func:`scratch_dir` makes.
_SCRATCH_NAME = re.compile(r"^\.(?:tmp|broken)-.*-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{16}$")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (of any user). Never on Windows, where ``os.kill(pid, 0)``
    sends CTRL_C_EVENT instead of asking: there every folder counts as alive."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def sweep_scratch(parent: Path) -> list[str]:
    """Remove the scratch folders in ``parent`` whose process died before it cleaned up: one
    killed mid-export (SIGKILL, the OOM killer, an evicted pod) left a partial export, up to the
    model's size (2 GB for bge-reranker-v2-m3's IR), that nothing else would ever delete. Only
    folders of this host and PID namespace whose process no longer exists go; a PID reused since
    keeps its folder (it is swept once that process ends). Returns the names removed."""
    tag, removed = _process_tag(), []
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            found = _SCRATCH_NAME.match(name)
            if found and found.group(1) == tag and not _alive(int(found.group(2))):
                shutil.rmtree(parent / name, ignore_errors=True)
                removed.append(name)
    if removed:
        logger.info("rag-rerank: removed %d leftover export folder(s) in %s", len(removed), parent)
    return removed


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><tag>-<pid>-<random>`` with the permissions a plain
    ``mkdir`` gives (0o777 less the umask, as the files written into it get). The folders that
    dead processes left behind in ``parent`` are swept first (:func:`sweep_scratch`).

    Not ``tempfile.mkdtemp``: its folders are 0700, and renamed into place as cache entries they
    stay unreadable to every other user (a cache built as root in a Docker build step, then read
    by the service's user, who would try to export again into a folder it may not write)."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_scratch(parent)
    owner = f"{_process_tag()}-{os.getpid()}"
    for _ in range(100):
        path = parent / f"{prefix}{owner}-{secrets.token_hex(8)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free scratch folder name {prefix}* in {parent}")


@contextlib.contextmanager
def tmp_entry(final: Path, tokenizer_json: str, meta: dict[str, Any]) -> Iterator[Path]:
    """A scratch folder beside ``final`` for one export (:func:`scratch_dir`), holding the
    tokenizer and ``meta.json`` already; removed unless :func:`publish` moved it into place."""
    tmp = scratch_dir(final.parent, f".tmp-{final.name}-")
    try:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


_defer_sessions: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "rag_rerank_defer_onnx_sessions", default=False
)


@contextlib.contextmanager
def deferred_sessions() -> Iterator[None]:
    """ONNX models loaded inside this block open no onnxruntime session at load: for a caller
    that replaces the session (the OpenVINO backends), which then never opens one at all."""
    token = _defer_sessions.set(True)
    try:
        yield
    finally:
        _defer_sessions.reset(token)


def cached_entry(
    spec: ModelSpec,
    *,
    format_version: int,
    export: Callable[[ModelSpec, Path, Path, str, int], None],
    open_entry: Callable[[Path], Any],
    threads: int,
    **extra: str,
) -> Any:
    """The loaded model for ``spec``, from its cache entry, exported first when missing.

    ``export(spec, model_dir, entry, mode, opset)`` writes and publishes the entry; ``open_entry``
    opens a published one, whose onnxruntime session is then opened at once (unless under
    :func:`deferred_sessions`). A damaged entry (:func:`entry_damage`, or one onnxruntime cannot
    open) is logged, removed and exported again, never served; a cache folder that cannot be
    written raises :class:`ModelLoadError` naming it (:func:`writable`). One thread of one
    process exports an entry at a time (:func:`_build_entry`); a cached one loads without any
    lock.
    """
    mode = mode_of(spec)
    opset = opset_of(spec)
    cache = cache_dir_of(spec)
    with loading_errors(spec):
        folder = model_dir(spec)
        key = entry_key(
            model_fingerprint(folder, skip=cache),
            mode,
            opset,
            format_version=format_version,
            **extra,
        )
        entry = cache / key
        model, _ = _open_checked(entry, open_entry)
        if model is None:
            model = _build_entry(spec, entry, folder, mode, opset, export, open_entry)
    logger.info(
        "rag-rerank: onnxruntime %s for %s: %d intra-op thread(s), 1 inter-op, spinning off "
        "(export %s)",
        mode,
        spec.model,
        threads,
        entry,
    )
    return model


def _build_entry(
    spec: ModelSpec,
    entry: Path,
    folder: Path,
    mode: str,
    opset: int,
    export: Callable[[ModelSpec, Path, Path, str, int], None],
    open_entry: Callable[[Path], Any],
) -> Any:
    """Export ``entry`` (missing or damaged at the first look) and open it, as the one builder
    among processes (:func:`._build_lock.build_lock`): a process that waited for another's export
    finds it published at the second look and exports nothing."""
    cache = entry.parent
    with build_lock(entry, "ONNX export"):
        # Published, or replaced, by another process since the first look: look again.
        model, damage = _open_checked(entry, open_entry)
        if model is not None:
            return model
        if damage != "missing":
            logger.warning(
                "rag-rerank: cached ONNX export %s is damaged (%s): exporting again", entry, damage
            )
            with writable(spec, cache, "remove the damaged ONNX export"):
                discard_entry(entry)
        with writable(spec, cache, "write the ONNX export"):
            export(spec, folder, entry, mode, opset)
        model, damage = _open_checked(entry, open_entry)
    if model is None:
        raise ModelLoadError(
            spec.model,
            spec.backend,
            f"the ONNX export {entry} cannot be loaded ({damage}); delete it",
        )
    return model


def _open_checked(entry: Path, open_entry: Callable[[Path], Any]) -> tuple[Any, str | None]:
    """(the opened model, None), or (None, why not): ``"missing"``, or the damage found by
    :func:`entry_damage` or by opening it (a graph onnxruntime cannot open, a tokenizer that
    does not parse). Configuration errors (a bad score label) and missing extras propagate."""
    damage = entry_damage(entry, graph=not _defer_sessions.get())
    if damage is not None:
        return None, damage
    model = None
    try:
        model = open_entry(entry)
        if not _defer_sessions.get():
            model.ensure_session()  # a graph onnxruntime cannot open fails the load
    except (MissingDependencyError, ConfigurationError):
        raise
    except Exception as exc:
        if model is not None:
            with contextlib.suppress(Exception):
                model.close()
        return None, f"{type(exc).__name__}: {exc}"
    return model, None


def entry_bytes(entry: Path) -> int:
    """The ONNX graph's size on disk (with external weights): a fair proxy for what
    onnxruntime holds (its arena grows with batch shapes, on top)."""
    try:
        return sum(
            f.stat().st_size
            for f in entry.iterdir()
            if f.is_file() and (f.suffix == ".onnx" or f.name.endswith(".onnx_data"))
        )
    except OSError:
        return 0


def st_for_export(spec: ModelSpec, folder: Path, class_name: str) -> Any:
    """The sentence-transformers model (``CrossEncoder``, ``SentenceTransformer``) to export:
    float32 on the CPU, in eval mode. Needs the ``st`` extra; only exports do."""
    st = import_optional(
        "sentence_transformers",
        "sentence-transformers",
        "st",
        f"Exporting {spec.model!r} to ONNX (once; a cached export needs only onnxruntime)",
    )
    loading = {k: spec.option(k) for k in sorted(ST_LOADING) if spec.option(k) is not None}
    with loading_errors(spec), building():
        model = getattr(st, class_name)(
            str(folder) if spec.is_local_path else spec.model,
            device="cpu",
            model_kwargs=model_kwargs_for("float32"),
            **loading,
        )
    model.eval()
    return model


def publish_export(spec: ModelSpec, tmp: Path, final: Path, started: float) -> None:
    """Record the sha256 of the entry's files in its ``meta.json`` (every load checks them:
    :func:`entry_damage`), publish the checked export, count it and log what it cost."""
    meta_path = tmp / "meta.json"
    recorded = json.loads(meta_path.read_text(encoding="utf-8"))
    recorded["sha256"] = entry_hashes(tmp)
    meta_path.write_text(json.dumps(recorded, indent=1), encoding="utf-8")
    publish(tmp, final)
    note_export()
    meta = json.loads((final / "meta.json").read_text(encoding="utf-8"))
    logger.info(
        "rag-rerank: exported %s to ONNX (%s, opset %d) in %.1fs: %s",
        spec.model,
        meta["mode"],
        meta["opset"],
        time.perf_counter() - started,
        final,
    )


def fast_tokenizer_json(spec: ModelSpec, tokenizer: Any, fallback: str) -> str:
    """The Rust tokenizer's JSON, which the ONNX backends run without transformers."""
    backend_tok = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tok is None:
        raise ConfigurationError(
            f"{spec.model!r} has no fast (Rust) tokenizer, which the ONNX backends run without "
            f"transformers; use backend={fallback!r}."
        )
    return str(backend_tok.to_str())


def export_graph(
    module: Any,
    args: tuple[Any, ...],
    folder: Path,
    *,
    inputs: list[str],
    output: str,
    output_axes: dict[int, str],
    mode: str,
    opset: int,
) -> None:
    """``module(*args)`` to ``folder/model.onnx`` (TorchScript exporter; dynamic batch and
    sequence axes on every input), quantized when ``mode`` is int8. ``args`` must be a padded
    batch, or the traced graph may drop the attention mask."""
    import warnings

    import torch

    fp32 = folder / ("model.onnx" if mode == "float32" else "model-fp32.onnx")
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes[output] = output_axes
    with torch.no_grad(), warnings.catch_warnings(), steady_default_dtype():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(fp32),
            input_names=inputs,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    if mode == "int8":
        quantize_int8(fp32, folder / "model.onnx")
        fp32.unlink()
        for extra in folder.glob("*.data"):
            extra.unlink()


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8: int8 per-channel weights for every MatMul, activations quantized per pass."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_logger = logging.getLogger()  # it warns on the root logger about pre-processing
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=source.stat().st_size > 1_800_000_000,
        )
    finally:
        quant_logger.setLevel(level)


# -- tokenizers -------------------------------------------------------------------------------


def tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    """What :func:`configure_tokenizer` needs from a Hugging Face tokenizer, for ``meta.json``."""
    return {
        "truncation_side": tokenizer.truncation_side,
        "padding_side": tokenizer.padding_side,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
    }


def same_tokens(got: Any, ref: Any, name: str) -> bool:
    """Whether our prepared ``got`` (padded further on the right, to a length bucket: see
    ``_shapes``) holds exactly the reference tokenizer's ``ref``, the extra columns being
    padding (mask 0)."""
    import numpy as np

    width = ref.shape[1]
    if got.shape[0] != ref.shape[0] or got.shape[1] < width:
        return False
    tokens, extra = got[:, :width], got[:, width:]
    return bool(np.array_equal(tokens, ref)) and not (name == "attention_mask" and extra.any())


def configure_tokenizer(tokenizer: Any, meta: dict[str, Any], max_length: int | None) -> Any:
    """Truncation (``max_length``; None: none) and batch padding as the export recorded them,
    so ``encode_batch`` returns what the Hugging Face tokenizer call returned at export."""
    if max_length:
        tokenizer.enable_truncation(
            int(max_length), strategy="longest_first", direction=meta["truncation_side"]
        )
    else:
        tokenizer.no_truncation()
    tokenizer.enable_padding(
        direction=meta["padding_side"],
        pad_id=int(meta["pad_token_id"] or 0),
        pad_type_id=int(meta["pad_token_type_id"]),
        pad_token=meta["pad_token"] or "[PAD]",
    )
    return tokenizer


# -- what both loaded models hold -------------------------------------------------------------


class OnnxRuntimeModel:
    """Mixin for the ONNX backends' loaded models: a published cache entry opened (its
    ``meta.json``, its tokenizer with the recorded truncation and padding, an onnxruntime session
    with the thread policy), tokenising, the footprint and release. Listed before the protocol
    base class (``RerankerModel``, ``EmbedderModel``) so these methods win.

    The session is opened on first use (:attr:`session`, :meth:`ensure_session`); assigning one
    (the OpenVINO backends' compiled model) or closing the model before that means the export's
    ``model.onnx`` is never opened by onnxruntime."""

    device: str = "cpu"
    dtype: str = "float32"
    max_tokens: int | None = None
    #: Bucket steps per doubling of the pass length (None: ``_shapes``' default); the OpenVINO
    #: backends, which run this model's ``prepare``, set their own.
    length_steps: int | None = None
    tokenizer: Any
    #: Whether :attr:`tokenizer_json` keeps the entry's ``tokenizer.json`` in memory (the
    #: cross-encoder's long-document windows build their tokenizer from it, on first use).
    keep_tokenizer_json: ClassVar[bool] = False

    def __init__(self, entry: Path, *, threads: int, max_length: int | None = None) -> None:
        """``max_length`` overrides the model's own truncation length (None: the model's)."""
        from tokenizers import Tokenizer

        self.threads = threads
        self.path = entry
        self._session: Any = None
        self._session_source: Path | None = entry / "model.onnx"  # opened on first use
        self._session_lock = ForkSafeLock()
        self.meta: dict[str, Any] = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        raw = (entry / "tokenizer.json").read_bytes()
        #: The entry's ``tokenizer.json`` as read at load (None unless ``keep_tokenizer_json``;
        #: None once closed). Why in memory: nothing may be read from the entry after the load,
        #: since the cache folder may be deleted (or an entry rebuilt) while the model serves;
        #: re-reading it there failed every windowed call of a loaded model.
        self.tokenizer_json: bytes | None = raw if self.keep_tokenizer_json else None
        self.tokenizer = configure_tokenizer(
            Tokenizer.from_buffer(raw),
            self.meta,
            self._truncation(max_length),
        )
        self.dtype = "int8" if self.meta["mode"] == "int8" else "float32"
        truncation = self.tokenizer.truncation
        self.max_tokens = int(truncation["max_length"]) if truncation else None
        # What the export baked in beyond the plain graph (e.g. the pruned last layer).
        self.kernels = str(self.meta.get("kernels") or "")

    def _truncation(self, max_length: int | None) -> int | None:
        """``max_length`` (None: the export's), at most what the model's position table holds
        (``positions``, recorded at export since this release): a longer input failed every
        pass holding it inside onnxruntime ("Attempting to broadcast an axis ..."), as the torch
        model fails (see ``_torch_common.cap_to_positions``); it is truncated there instead."""
        limit = max_length or self.meta["max_length"]
        positions = self.meta.get("positions")
        if isinstance(positions, int) and positions > 0 and (not limit or limit > positions):
            warn_past_positions(max_length, positions, str(self.meta.get("model")))
            limit = positions
        return limit

    def tokenize(self, inputs: list[Any]) -> dict[str, Any]:
        """int64 arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` for texts or
        (text, text) pairs, padded to the bucket length of the batch's longest
        (:func:`~rag_rerank_plugins._shapes.bucket_length`: onnxruntime's arena and
        kernels keep state per shape, like oneDNN's; issue 21)."""
        import numpy as np

        from .._shapes import bucket_length, buckets_enabled

        encodings = self.tokenizer.encode_batch(inputs)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        arrays = {name: np.asarray(rows, dtype=np.int64) for name, rows in columns.items()}
        width = arrays["input_ids"].shape[1] if arrays["input_ids"].ndim == 2 else 0
        steps = self.length_steps
        extra = bucket_length(width, self.max_tokens, steps) - width if self.max_tokens else 0
        if extra > 0 and buckets_enabled():
            # On the right whatever the tokenizer's side: on the left it moved every real
            # token's position (see _torch_common.pad_to_bucket).
            fills = {
                "input_ids": int(self.meta["pad_token_id"] or 0),
                "attention_mask": 0,
                "token_type_ids": int(self.meta["pad_token_type_id"]),
            }
            sides = ((0, 0), (0, extra))
            arrays = {
                name: np.pad(a, sides, constant_values=fills[name]) for name, a in arrays.items()
            }
        return arrays

    @property
    def session(self) -> Any:
        """What runs the graph (``run(output_names, feed)``): the onnxruntime session, opened on
        first use, or whatever was assigned instead; None once closed."""
        if self._session is None and self._session_source is not None:
            return self.ensure_session()
        return self._session

    @session.setter
    def session(self, value: Any) -> None:
        with self._session_lock:
            self._session = value
            self._session_source = None  # replaced or closed: model.onnx is never opened

    def ensure_session(self) -> Any:
        """Open the onnxruntime session now, if nothing was opened or assigned yet."""
        with self._session_lock:
            if self._session is None and self._session_source is not None:
                self._session = open_session(self._session_source, self.threads)
                self._session_source = None
            return self._session

    def footprint_bytes(self) -> int | None:
        return entry_bytes(self.path)

    def close(self) -> None:
        self.session = None
        self.tokenizer = None
        self.tokenizer_json = None
