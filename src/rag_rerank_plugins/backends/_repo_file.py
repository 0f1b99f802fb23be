"""A repository's own ONNX file, run by our cross-encoder runtimes (option ``file_name``).

Why it exists: sentence-transformers users load the files a model repository ships, e.g.
``CrossEncoder(name, backend="onnx", model_kwargs={"file_name":
"onnx/model_qint8_avx512_vnni.onnx"})`` for its dynamically quantized export. Through
LangChain's ``HuggingFaceCrossEncoder(model_kwargs=...)`` those arguments reach us unchanged
(``_stock`` reads them as option ``file_name``), and swapping the class must run the same file,
not our own export of the weights. So ``onnx-cross-encoder`` (and ``openvino-cross-encoder``
through its ONNX twin) copy the named file into an entry of the export cache in place of
exporting, with the tokenizer and labels read as for an export; the rest (verification at every
load, buckets, workers, the IR conversion) is unchanged. The file is run as it is: no pruned
last layer, no quantization of ours on top.

Where the file is looked up, as sentence-transformers does (``backend_should_export``):
``<file_name>`` in the model folder, then ``onnx/<file_name>`` for a bare name; from the hub for
a hub name (``hf_hub_download``: revision, cache folder, offline mode as for the weights). An
external-data file beside it (``<file>_data``, as optimum writes above 2 GB) comes with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError, ModelNotFoundError

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["copy_file", "file_key", "file_option", "repo_file"]


def file_option(spec: ModelSpec) -> str | None:
    """Option ``file_name`` checked: a relative POSIX path of a ``.onnx`` file inside the
    repository (no ``..``), or None."""
    value = spec.option("file_name")
    if value is None:
        return None
    path = PurePosixPath(str(value).replace("\\", "/")) if isinstance(value, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or path.suffix != ".onnx":
        raise ConfigurationError(
            f"file_name={value!r} must name an .onnx file inside the model's repository or "
            "folder, relative to it (e.g. 'onnx/model_qint8_avx512_vnni.onnx')."
        )
    if spec.option("quantize") is not None:
        raise ConfigurationError(
            f"file_name={value!r} and quantize={spec.option('quantize')!r}: the repository's "
            "file is run as it is; give one of them."
        )
    return path.as_posix()


def _candidates(name: str) -> list[str]:
    return [name] if "/" in name else [name, f"onnx/{name}"]


def repo_file(spec: ModelSpec, folder: Path, name: str) -> Path:
    """The local path of ``name`` (downloaded first for a hub model)."""
    if spec.is_local_path:
        for candidate in _candidates(name):
            if (folder / candidate).is_file():
                return folder / candidate
        found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx"))
        raise ConfigurationError(
            f"file_name={name!r}: no such file in {folder}"
            + (f"; its ONNX files: {', '.join(found)}." if found else " (it holds no .onnx file).")
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    local_only = bool(spec.option("local_files_only", False)) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes")

    def download(file: str) -> Path:
        return Path(
            hf_hub_download(
                spec.model,
                file,
                revision=spec.option("revision"),
                cache_dir=spec.option("cache_folder"),
                local_files_only=local_only,
            )
        )

    for candidate in _candidates(name):
        try:
            path = download(candidate)
        except EntryNotFoundError:
            continue
        except Exception as exc:
            raise ModelNotFoundError(spec.model, spec.backend, exc) from exc
        # Its external data, when it has some (optimum writes it above 2 GB); none is the rule.
        with contextlib.suppress(Exception):
            download(candidate + "_data")
        return path
    raise ConfigurationError(f"file_name={name!r}: {spec.model!r} has no such file.")


def _external_data(path: Path) -> list[Path]:
    """The external-data file beside ``path`` that optimum writes (``<file>_data``)."""
    return [p for p in (path.with_name(path.name + "_data"),) if p.is_file()]


def file_key(path: Path) -> str:
    """What identifies the file's contents in the cache key: the hub blob's name (a content
    hash) for a file in a hub cache, else its size and mtime (the model folder's fingerprint
    covers a local file too)."""
    from ._onnx_common import hub_blob

    stat = path.stat()
    return hub_blob(path) or f"{stat.st_size}-{stat.st_mtime_ns}"


def copy_file(path: Path, entry: Path) -> None:
    """``path`` into the scratch entry as ``model.onnx``, its external data under its own name
    (the graph refers to it by that name)."""
    shutil.copyfile(path, entry / "model.onnx")
    for extra in _external_data(path):
        shutil.copyfile(extra, entry / extra.name)
