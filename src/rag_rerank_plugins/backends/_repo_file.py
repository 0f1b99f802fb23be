"""A repository's own ONNX file or OpenVINO IR, run by our ONNX and OpenVINO runtimes (option
``file_name``).

Why it exists: sentence-transformers users load the files a model repository ships, e.g.
``CrossEncoder(name, backend="onnx", model_kwargs={"file_name":
"onnx/model_qint8_avx512_vnni.onnx"})`` for its dynamically quantized export, or
``backend="openvino"`` with ``openvino/openvino_model_qint8_quantized.xml``. Through LangChain's
``HuggingFaceCrossEncoder(model_kwargs=...)`` those arguments reach us unchanged (``_stock`` reads
them as option ``file_name``), and swapping the class must run the same file, not our own export
of the weights. So the ONNX backends (and the OpenVINO ones through their ONNX twin) copy a
named ONNX file into an entry of the export cache in place of exporting, with the tokenizer,
labels, pooling and prompts read as for an export; the rest (the check against the torch model,
verification at every load, buckets, workers, an embedder's pooling, the IR conversion) is
unchanged. The OpenVINO backends copy a named IR into their IR cache in place of converting
(``_openvino_common``). The file is run as it is: no pruned last layer, no quantization of ours
on top.

Where the file is looked up, as sentence-transformers does (``backend_should_export``):
``<file_name>`` in the model folder, then ``onnx/<file_name>`` (an IR: ``openvino/``) for a bare
name; from the hub for a hub name (``hf_hub_download``: revision, cache folder, offline mode as
for the weights). Its companion comes with it: an IR's ``.bin``, an ONNX graph's external data
(``<file>_data``, as optimum writes above 2 GB).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError, ModelNotFoundError

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = [
    "check_file_name",
    "companion_files",
    "copy_file",
    "file_key",
    "file_option",
    "located",
    "repo_file",
]


def check_file_name(value: object, suffixes: tuple[str, ...], source: str = "file_name") -> str:
    """``value`` as a relative POSIX path of a file with one of ``suffixes`` inside the
    repository (no ``..``), or a ConfigurationError naming ``source``. Shared by the adapters
    (sentence-transformers' ``file_name``, at construction) and the loaders (the option)."""
    path = PurePosixPath(value.replace("\\", "/")) if isinstance(value, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or path.suffix not in suffixes:
        raise ConfigurationError(
            f"{source}={value!r} must name an {' or '.join(suffixes)} file inside the model's "
            "repository or folder, relative to it (e.g. 'onnx/model_qint8_avx512_vnni.onnx')."
        )
    return path.as_posix()


def file_option(spec: ModelSpec, suffixes: tuple[str, ...] = (".onnx",)) -> str | None:
    """Option ``file_name`` checked (:func:`check_file_name`, and no ``quantize`` beside it),
    or None."""
    value = spec.option("file_name")
    if value is None:
        return None
    name = check_file_name(value, suffixes)
    if spec.option("quantize") is not None:
        raise ConfigurationError(
            f"file_name={value!r} and quantize={spec.option('quantize')!r}: the repository's "
            "file is run as it is; give one of them."
        )
    return name


def located(spec: ModelSpec, name: str) -> tuple[Path, str]:
    """The local path of ``name`` (:func:`repo_file`) and what names it in a cache key:
    ``"<name>:<contents>"`` (:func:`file_key`), so each file and version gets its own entry."""
    from ._onnx_common import model_dir
    from ._torch_common import loading_errors

    with loading_errors(spec):
        path = repo_file(spec, model_dir(spec), name)
    return path, f"{name}:{file_key(path)}"


def _candidates(name: str) -> list[str]:
    """Where sentence-transformers looks: the name, then a bare name in its backend's folder."""
    folder = "openvino" if name.endswith(".xml") else "onnx"
    return [name] if "/" in name else [name, f"{folder}/{name}"]


def _companions(name: str) -> list[str]:
    """The files that come with ``name``: an IR's weights, an ONNX graph's external data."""
    return [name[: -len(".xml")] + ".bin"] if name.endswith(".xml") else [name + "_data"]


def repo_file(spec: ModelSpec, folder: Path, name: str) -> Path:
    """The local path of ``name`` (downloaded first for a hub model)."""
    if spec.is_local_path:
        for candidate in _candidates(name):
            if (folder / candidate).is_file():
                return folder / candidate
        pattern = "*.xml" if name.endswith(".xml") else "*.onnx"
        found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(pattern))
        raise ConfigurationError(
            f"file_name={name!r}: no such file in {folder}"
            + (f"; its {pattern} files: {', '.join(found)}." if found else f" (no {pattern}).")
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from ._onnx_common import offline

    local_only = offline(spec)

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
        for companion in _companions(candidate):
            # An IR's weights; an ONNX graph's external data (optimum writes it above 2 GB),
            # which is rarely there. A missing .bin fails when OpenVINO reads the IR.
            with contextlib.suppress(Exception):
                download(companion)
        return path
    raise ConfigurationError(f"file_name={name!r}: {spec.model!r} has no such file.")


def companion_files(path: Path) -> list[Path]:
    """The files beside ``path`` that come with it (:func:`_companions`) and exist."""
    return [p for p in (path.with_name(n) for n in _companions(path.name)) if p.is_file()]


def file_key(path: Path) -> str:
    """What identifies the file's contents (with its companions) in the cache key: the hub
    blob's name (a content hash) for a file in a hub cache, else its size and mtime (the model
    folder's fingerprint covers a local file too)."""
    from ._onnx_common import hub_blob

    keys = []
    for file in (path, *companion_files(path)):
        stat = file.stat()
        keys.append(hub_blob(file) or f"{stat.st_size}-{stat.st_mtime_ns}")
    return "+".join(keys)


def copy_file(path: Path, entry: Path) -> None:
    """``path`` into the scratch entry as ``model.onnx``, its external data under its own name
    (the graph refers to it by that name)."""
    shutil.copyfile(path, entry / "model.onnx")
    for extra in companion_files(path):
        shutil.copyfile(extra, entry / extra.name)
