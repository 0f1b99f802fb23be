"""One system of the peers harness (benchmarks/peers.py), warm in its own process.

    python benchmarks/peer_worker.py SYSTEM MODEL_DIR WORK_DIR

Runs under .venv (our engine, LangChain, LlamaIndex) or .venv-peers (sentence-transformers with
optimum-intel/optimum-onnx, which pin transformers below 5), so it imports only the standard
library at the top. It loads SYSTEM, answers ``{"ready": ...}`` (or ``{"error": ...}``), then
scores one request per stdin JSON line ``{"query": str, "passages": [str]}`` and answers
``{"ms": float, "scores": [float], "torch_threads": int | None}``: wall time of the user's one
call, measured here, the scores in passage order, and ``torch.get_num_threads()`` (None when the
system does not use torch). The ready answer names the system's runtime (torch, openvino or
onnxruntime) and the seconds it took to build it (for our adapters, which load lazily, only the
construction: the harness times the first call too). Libraries print to stdout, so the protocol
gets a private copy of the stdout descriptor and everything else goes to stderr. ``WORK_DIR``
holds the sentence-transformers exports (built once, reused) and the local calibration set
(``calib/train.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
T = TypeVar("T")
Scorer = Callable[[str, list[str]], tuple[float, list[float]]]
# Our engine's rows: name -> SharedRerankCompressor keyword arguments.
OURS: dict[str, dict[str, Any]] = {
    "ours_default": {},
    "ours_fp32": {"dtype": "float32"},  # the default path pinned to FP32 (AVX2-only CPUs' default)
    "ours_openvino_bf16": {"backend": "openvino-cross-encoder", "dtype": "bfloat16"},
    "ours_openvino_fp32": {"backend": "openvino-cross-encoder", "dtype": "float32"},
    "ours_openvino_int8": {
        "backend": "openvino-cross-encoder",
        "dtype": "bfloat16",
        "model_kwargs": {"quantize": "int8"},
    },
    "ours_onnx": {"backend": "onnx-cross-encoder", "dtype": "float32"},
    # sentence-transformers' own OpenVINO IR (st_openvino's file) run by our engine: the same
    # file, so the engines alone differ (no fused attention or pruned last layer of ours).
    "ours_openvino_st_ir": {
        "backend": "openvino",  # sentence-transformers' name: openvino-cross-encoder
        "dtype": "bfloat16",
        "model_kwargs": {"file_name": "openvino/openvino_model.xml"},
    },
}
#: Our rows that run a file of sentence-transformers' model copy (made by its st_* row first).
ON_ST_COPY = {"ours_openvino_st_ir": "st_openvino"}
ST_FILES = {  # ST peer -> (backend, exported file inside the model copy)
    "st_onnx": ("onnx", "onnx/model.onnx"),
    "st_onnx_qint8": ("onnx", "onnx/model_qint8_{isa}.onnx"),
    "st_openvino": ("openvino", "openvino/openvino_model.xml"),
    "st_openvino_fp32": ("openvino", "openvino/openvino_model.xml"),
    "st_openvino_bf16": ("openvino", "openvino/openvino_model.xml"),
    "st_openvino_int8": ("openvino", "openvino/openvino_model_qint8_quantized.xml"),
}


def _timed(call: Callable[[], T]) -> tuple[float, T]:
    """Wall milliseconds of the user's one call, and what it returned."""
    t0 = time.perf_counter()
    out = call()
    return (time.perf_counter() - t0) * 1000, out


def _ours(name: str, model: Path, work: Path) -> Scorer:
    import run  # benchmarks/run.py: the same factories as the other benchmarks
    from langchain_core.documents import Document

    from rag_rerank_plugins import ModelPool

    if name in ON_ST_COPY:
        peer = ON_ST_COPY[name]
        model = work / f"st-{model.name}"
        if not (model / ST_FILES[peer][1]).exists():
            raise ImportError(f"{peer}'s export is missing: run {peer} first (.venv-peers)")
    system = run.ours_factory(model, ModelPool(), **OURS[name])()

    def score(query: str, passages: list[str]) -> tuple[float, list[float]]:
        docs = [Document(page_content=p, metadata={"i": i}) for i, p in enumerate(passages)]
        ms, out = _timed(lambda: system.compress_documents(docs, query))
        got = {d.metadata["i"]: float(d.metadata["relevance_score"]) for d in out}
        return ms, [got[i] for i in range(len(passages))]

    return score


def _langchain(model: Path) -> Scorer:
    import run
    from langchain_core.documents import Document

    system = run.lc_anchor_factory(model)()
    client = system.model.client  # the sentence-transformers CrossEncoder it wraps
    seen: list[Any] = []
    predict = client.predict

    def spy(*args: Any, **kwargs: Any) -> Any:  # the reranker drops scores: keep a copy
        seen.append(out := predict(*args, **kwargs))
        return out

    client.predict = spy

    def score(query: str, passages: list[str]) -> tuple[float, list[float]]:
        docs = [Document(page_content=p) for p in passages]
        seen.clear()
        ms, _ = _timed(lambda: system.compress_documents(docs, query))
        return ms, [float(x) for x in seen[-1]]

    return score


def _llamaindex(model: Path) -> Scorer:
    import run
    from llama_index.core.schema import NodeWithScore, TextNode

    system = run.li_anchor_factory(model)()

    def score(query: str, passages: list[str]) -> tuple[float, list[float]]:
        nodes = [NodeWithScore(node=TextNode(text=p, id_=str(i))) for i, p in enumerate(passages)]
        ms, out = _timed(lambda: system.postprocess_nodes(nodes, query_str=query))
        got = {int(n.node.id_): float(n.score or 0.0) for n in out}
        return ms, [got[i] for i in range(len(passages))]

    return score


def _reference(model: Path) -> Scorer:
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model), device="cpu", model_kwargs={"dtype": torch.float32})
    return lambda q, ps: _timed(lambda: [float(x) for x in ce.predict([(q, p) for p in ps])])


def _isa() -> str:
    """The dynamic-quantization config a user picks for this CPU (sentence-transformers' names)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if os.uname().machine in ("aarch64", "arm64"):
        return "arm64"
    pairs = (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512"), ("avx2", "avx2"))
    return next((config for flag, config in pairs if flag in flags), "avx2")


def _built_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, made by ``build`` into a staging folder renamed into place, so a run killed
    mid-way leaves no half-built folder that a later run would take as done."""
    if not folder.exists():
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        build(staging)
        staging.rename(folder)
    return folder


def _st_copy(model: Path, work: Path) -> Path:
    """A copy of the model folder (weights, config, tokenizer) that the exports are saved into."""
    return _built_once(work / f"st-{model.name}", lambda tmp: shutil.copytree(model, tmp))


def _st_export(name: str, model: Path, work: Path) -> tuple[Path, str]:
    """The model copy and the file of ``name``'s export, made once by sentence-transformers'
    own export functions and reused (FlashRank and fastembed read the same ONNX files)."""
    from sentence_transformers import CrossEncoder

    backend, file_name = ST_FILES[name]
    file_name = file_name.format(isa=_isa())
    folder = _st_copy(model, work)
    base = ST_FILES["st_onnx" if backend == "onnx" else "st_openvino"][1]
    if not (folder / base).exists():  # first use: the library's own export, saved for reuse
        CrossEncoder(str(folder), backend=backend).save_pretrained(str(folder))
    if not (folder / file_name).exists():
        fp32 = CrossEncoder(str(folder), backend=backend, model_kwargs={"file_name": base})
        if name == "st_onnx_qint8":
            from sentence_transformers import export_dynamic_quantized_onnx_model

            export_dynamic_quantized_onnx_model(fp32, _isa(), str(folder))
        else:
            from optimum.intel import OVQuantizationConfig
            from sentence_transformers import export_static_quantized_openvino_model

            calib = work / "calib"  # a local data set: nothing may be downloaded
            export_static_quantized_openvino_model(
                fp32,
                OVQuantizationConfig(num_samples=300),
                str(folder),
                dataset_name=str(calib),
                dataset_config_name="default",
                dataset_split="train",
                column_name="sentence",
            )
    return folder, file_name


def _st(name: str, model: Path, work: Path) -> Scorer:
    from sentence_transformers import CrossEncoder

    folder, file_name = _st_export(name, model, work)
    kwargs: dict[str, Any] = {"file_name": file_name}
    if name == "st_openvino_fp32":
        kwargs["ov_config"] = {"INFERENCE_PRECISION_HINT": "f32"}
    elif name == "st_openvino_bf16":  # OpenVINO's default hint is BF16 only on AMX CPUs
        kwargs["ov_config"] = {"INFERENCE_PRECISION_HINT": "bf16"}
    ce = CrossEncoder(str(folder), backend=ST_FILES[name][0], model_kwargs=kwargs)
    return lambda q, ps: _timed(lambda: [float(x) for x in ce.predict([(q, p) for p in ps])])


def _flashrank(name: str, model: Path, work: Path) -> Scorer:
    """FlashRank's ``Ranker`` on the model's ONNX export (``flashrank``: FP32, as
    ``st_onnx``; ``flashrank_qint8``: dynamically quantized, as FlashRank ships its own models).

    FlashRank loads only the names of its catalogue, from ``cache_dir/<name>/<its file name>``
    plus the tokenizer files, and downloads anything missing; so the export goes, offline, into
    one catalogue slot (the TinyBERT one, whose file name carries no quantization suffix). Its
    scores are the sigmoid of a one-logit head, like ``CrossEncoder.predict``'s."""
    from flashrank import Ranker, RerankRequest
    from flashrank.Config import model_file_map
    from transformers import AutoTokenizer

    folder, file_name = _st_export("st_onnx_qint8" if "qint8" in name else "st_onnx", model, work)
    slot = "ms-marco-TinyBERT-L-2-v2"
    cache = work / name

    def build(staging: Path) -> None:
        staging.mkdir(parents=True)
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(staging))
        shutil.copy(folder / "config.json", staging / "config.json")
        shutil.copy(folder / file_name, staging / model_file_map[slot])

    _built_once(cache / slot, build)
    ranker = Ranker(model_name=slot, cache_dir=str(cache), max_length=512)

    def score(query: str, passages: list[str]) -> tuple[float, list[float]]:
        request = RerankRequest(query, [{"id": i, "text": p} for i, p in enumerate(passages)])
        ms, out = _timed(lambda: ranker.rerank(request))
        got = {r["id"]: float(r["score"]) for r in out}
        return ms, [got[i] for i in range(len(passages))]

    return score


def _fastembed(name: str, model: Path, work: Path) -> Scorer:
    """fastembed's ``TextCrossEncoder`` on the FP32 ONNX export, registered as a custom model
    and loaded from a local folder (``specific_model_path``: nothing is downloaded).

    fastembed truncates to the smaller of ``model_max_length`` and ``max_length`` in
    tokenizer_config.json, and the packaged MiniLM's carries a stray ``max_length: 128`` (every
    other system reads 512 tokens): its copy drops that key. It returns raw logits; the
    sentence-transformers sigmoid is applied here so the quality columns compare."""
    import math

    from fastembed.common.model_description import ModelSource
    from fastembed.rerank.cross_encoder import TextCrossEncoder

    source, file_name = _st_export("st_onnx", model, work)

    def build(staging: Path) -> None:
        shutil.copytree(source, staging)
        config = json.loads((staging / "tokenizer_config.json").read_text())
        config.pop("max_length", None)
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    folder = _built_once(work / "fastembed" / source.name, build)
    custom = f"local/{model.name}"
    if custom.lower() not in {m["model"].lower() for m in TextCrossEncoder.list_supported_models()}:
        TextCrossEncoder.add_custom_model(custom, ModelSource(hf=custom), model_file=file_name)
    encoder = TextCrossEncoder(custom, specific_model_path=str(folder))

    def score(query: str, passages: list[str]) -> tuple[float, list[float]]:
        ms, logits = _timed(lambda: list(encoder.rerank(query, passages)))
        return ms, [1 / (1 + math.exp(-float(x))) for x in logits]

    return score


def runtime_of(name: str) -> str:
    """The library that runs ``name``'s forward passes, recorded in its row (the harness used to
    guess it from the row name, and a renamed row on OpenVINO came out as "torch")."""
    if name in OURS:
        backend = str(OURS[name].get("backend", "cross-encoder"))
    elif name in ST_FILES:
        backend = ST_FILES[name][0]
    elif name in ("flashrank", "flashrank_qint8", "fastembed"):
        backend = "onnx"
    else:  # LangChain, LlamaIndex, the reference: sentence-transformers on torch
        backend = "torch"
    return "openvino" if "openvino" in backend else "onnxruntime" if "onnx" in backend else "torch"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        *("torch", "transformers", "sentence-transformers", "optimum-intel", "optimum-onnx"),
        *("openvino", "onnxruntime", "langchain-community", "llama-index-core"),
        *("flashrank", "fastembed"),
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def load(name: str, model: Path, work: Path) -> Scorer:
    if name in OURS:
        return _ours(name, model, work)
    if name == "langchain":
        return _langchain(model)
    if name == "llamaindex":
        return _llamaindex(model)
    if name == "reference_fp32":
        return _reference(model)
    if name in ST_FILES:
        return _st(name, model, work)
    if name in ("flashrank", "flashrank_qint8"):
        return _flashrank(name, model, work)
    if name == "fastembed":
        return _fastembed(name, model, work)
    raise ValueError(f"unknown system {name!r}")


def main() -> int:
    name, model, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr, never into the protocol
    sys.stdout = sys.stderr
    sys.path.insert(0, str(HERE))
    from bench_common import torch_threads

    def say(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    try:
        scorer = load(name, model, work)
    except ImportError as exc:
        say({"error": f"not available: {exc}"})
        return 0
    except Exception as exc:  # any load failure becomes the row's text
        traceback.print_exc()
        say({"error": f"load failed: {type(exc).__name__}: {exc}"[:300]})
        return 0
    say(
        {
            "ready": True,
            "load_s": time.perf_counter() - t0,
            "versions": versions(),
            "runtime": runtime_of(name),
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ms, scores = scorer(request["query"], request["passages"])
            # torch's threads after the call: our adapters load (and set them) on the first one.
            say({"ms": ms, "scores": scores, "torch_threads": torch_threads()})
        except Exception as exc:
            traceback.print_exc()
            say({"error": f"request failed: {type(exc).__name__}: {exc}"[:300]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
