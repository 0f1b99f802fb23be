"""Emptying oneDNN's process-wide primitive cache when the last CPU model is released.

torch runs BF16 (and some FP32) matrix products on CPU through oneDNN, which keeps every
primitive it builds (JIT-compiled kernels and their descriptors) in one process-wide LRU cache of
1024 entries. With the engine's bounded pass shapes that cache holds ~70 MiB for a MiniLM-sized
reranker, and it outlives the model: after ``pool.release()`` RSS stayed ~20 % above the pre-load
figure, where issue 21 asks for 10 %. Turning the cache off (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``)
makes every pass ~10x slower, so the cache must stay while a model serves and be emptied once no
model needs it.

oneDNN's own call for that, ``dnnl_set_primitive_cache_capacity`` (set 0, then set the old
capacity back), is compiled into ``libtorch_cpu.so`` but not exported, and torch has no Python
call for it. The function is still listed in the library's ELF symbol table, so this module reads
its offset there, anchors it to the loaded library through an exported symbol (``dlsym``), and
calls it through ctypes. It only does so when every check holds: Linux, torch already imported,
the library file has a symbol table with both oneDNN functions as sized functions, and the getter
answers ``dnnl_success`` with a plausible capacity. Anything else answers ``False`` and changes
nothing; ``RAG_RERANK_ONEDNN_FLUSH=0`` (or ``RAG_RERANK_RELEASE_PROCESS_MEMORY=0``, which also
leaves glibc alone, see :mod:`rag_rerank_plugins._memory`) turns it off.

A flush never frees a primitive in use (oneDNN holds them by shared pointers); a model still
loaded elsewhere in the process rebuilds its kernels once, on its next passes.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ._forksafe import ForkSafeLock

__all__ = ["flush_primitive_cache", "primitive_cache_capacity"]

logger = logging.getLogger("rag_rerank_plugins.memory")

_GET = b"dnnl_get_primitive_cache_capacity"
_SET = b"dnnl_set_primitive_cache_capacity"
_STT_FUNC = 2
_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
# Elf64_Shdr: type, offset, size, link, entsize (name, flags, addr, info, align skipped)
_SHDR = struct.Struct("<4xI16xQQI12xQ")
_lock = ForkSafeLock()


def _enabled() -> bool:
    return os.environ.get("RAG_RERANK_ONEDNN_FLUSH", "1").strip().lower() not in {
        "0",
        "false",
        "no",
    }


def _torch_cpu_library() -> Path | None:
    torch = sys.modules.get("torch")
    where = getattr(torch, "__file__", None)
    if where is None or not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    path = Path(where).parent / "lib" / "libtorch_cpu.so"
    return path if path.is_file() else None


class _Section(NamedTuple):
    kind: int
    offset: int
    size: int
    link: int
    entsize: int


def _section_headers(data: mmap.mmap) -> list[_Section]:
    """The ELF64 section headers, in file order (``link`` indexes this list)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit, little-endian
        return []
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    out = []
    for i in range(shnum):
        base = shoff + i * shentsize
        kind, offset, size, link, entsize = _SHDR.unpack_from(data, base)
        out.append(_Section(kind, offset, size, link, entsize))
    return out


def _find_symbols(
    data: mmap.mmap, table: _Section, strings: _Section, names: list[bytes]
) -> dict[bytes, tuple[int, int]]:
    """``name -> (value, size)`` for defined functions among ``names`` in one symbol table."""
    import numpy as np

    str_off, str_size = strings.offset, strings.size
    wanted: dict[int, bytes] = {}
    for name in names:
        hit = data.find(b"\x00" + name + b"\x00", str_off, str_off + str_size)
        if hit >= 0:
            wanted[hit + 1 - str_off] = name
    if not wanted:
        return {}
    offset, size, entsize = table.offset, table.size, table.entsize
    if entsize != _SYM.size:
        return {}
    dtype = np.dtype(
        [
            ("name", "<u4"),
            ("info", "u1"),
            ("other", "u1"),
            ("shndx", "<u2"),
            ("value", "<u8"),
            ("size", "<u8"),
        ]
    )
    rows = np.frombuffer(data, dtype=dtype, count=size // entsize, offset=offset)
    found: dict[bytes, tuple[int, int]] = {}
    for index in np.flatnonzero(np.isin(rows["name"], np.fromiter(wanted, dtype="<u4"))):
        row = rows[index]
        if row["info"] & 0xF == _STT_FUNC and row["shndx"] != 0 and row["size"] > 0:
            found[wanted[int(row["name"])]] = (int(row["value"]), int(row["size"]))
    return found


def _first_exported_function(
    data: mmap.mmap, dynsym: _Section, dynstr: _Section
) -> tuple[str, int] | None:
    """An exported function's name and address in the file: the anchor for the load bias."""
    if dynsym.entsize != _SYM.size:
        return None
    for pos in range(
        dynsym.offset + _SYM.size, dynsym.offset + dynsym.size, _SYM.size
    ):  # 0 is null
        name_off, info, _other, shndx, value, sym_size = _SYM.unpack_from(data, pos)
        if info & 0xF == _STT_FUNC and info >> 4 == 1 and shndx != 0 and sym_size > 0:  # GLOBAL
            start = dynstr.offset + name_off
            return data[start : data.find(b"\x00", start)].decode("ascii", "replace"), value
    return None


@functools.lru_cache(maxsize=1)
def _functions() -> tuple[Callable[[Any], int], Callable[[int], int]] | None:
    """The getter and setter as ctypes functions, or None when any check fails."""
    path = _torch_cpu_library()
    if path is None:
        return None
    import ctypes

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            headers = _section_headers(data)
            symtab = next((s for s in headers if s.kind == _SHT_SYMTAB), None)
            dynsym = next((s for s in headers if s.kind == _SHT_DYNSYM), None)
            if symtab is None or dynsym is None:
                return None
            found = _find_symbols(data, symtab, headers[symtab.link], [_GET, _SET])
            anchor = _first_exported_function(data, dynsym, headers[dynsym.link])
        if len(found) != 2 or anchor is None:
            return None
        library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        bias = ctypes.cast(getattr(library, anchor[0]), ctypes.c_void_p).value
        if bias is None:
            return None
        bias -= anchor[1]
        getter = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))(bias + found[_GET][0])
        setter = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(bias + found[_SET][0])
    except (OSError, ValueError, AttributeError, IndexError, struct.error) as exc:
        logger.debug("rag-rerank: oneDNN cache call not found: %s", exc)
        return None
    capacity = ctypes.c_int(-1)
    if getter(ctypes.byref(capacity)) != 0 or not 0 <= capacity.value <= 1 << 20:
        return None
    return getter, setter


def primitive_cache_capacity() -> int | None:
    """oneDNN's primitive cache capacity in this process, or None when it cannot be read."""
    import ctypes

    functions = _functions()
    if functions is None:
        return None
    capacity = ctypes.c_int(-1)
    return capacity.value if functions[0](ctypes.byref(capacity)) == 0 else None


def flush_primitive_cache() -> bool:
    """Empty oneDNN's primitive cache and restore its capacity. True when it was emptied."""
    if not _enabled():
        return False
    import ctypes

    functions = _functions()
    if functions is None:
        return False
    getter, setter = functions
    with _lock:
        capacity = ctypes.c_int(-1)
        if getter(ctypes.byref(capacity)) != 0 or capacity.value <= 0:
            return False
        if setter(0) != 0:
            return False
        if setter(capacity.value) != 0:
            logger.warning(
                "rag-rerank: could not restore oneDNN's primitive cache capacity %d", capacity.value
            )
        return True
