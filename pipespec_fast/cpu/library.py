"""The one C library of the CPU kernels: built from ``csrc/`` on first use, checked, loaded once.

Every C file (``skinny_gemm.c``, ``quant_gemm.c``, ``int8_gemm.c``, ``cpu_decoder.c``,
``thread_pool.c``) is compiled into one shared library: the fused decoder calls the GEMMs, and
every kernel shares one thread pool. This module is its only builder and loader and declares
every ctypes signature (mirroring the headers in ``csrc/``); ``gemm.py``, ``quant.py``,
``int8.py`` and ``decoder.py`` hold their kernel's Python entry and get the library from
:func:`load`. It is loaded with :class:`ctypes.CDLL`, so calls release the GIL.

**The build cache.** ``<cache_dir>/build/pipespec_cpu-<key>.so``, where ``key`` hashes the
sources, headers, flags and the compiler's version (an edit or a compiler upgrade builds
afresh). A build is compiled into a temporary file, loaded from it, and then published by an
atomic rename together with ``<name>.sha256``, the file's SHA-256. Loading a library runs its
constructors, i.e. code, so a cached file is loaded only if it is a regular file owned by this
user or root and writable by no one else, in a build directory with the same properties, and
its content hashes to the recorded value. The ownership and mode checks keep other users from
planting a file; the hash catches a file changed after it was built or put there without a
build. Anything else is never loaded: the library is rebuilt into a fresh file that replaces
it (one warning). If the build directory itself fails the check, the library is built in a
private temporary directory instead.

The AVX code is enabled per function (``#pragma GCC target``), so the library loads anywhere and
checks avx2/fma itself. If the CPU lacks them, the compiler is missing or the build fails,
:func:`load` returns ``None`` (with one warning) and callers fall back to numpy / torch.
``PIPESPEC_C_KERNELS=0`` turns the library off, ``PIPESPEC_CC`` names the compiler,
``PIPESPEC_CACHE`` moves the cache (``pipespec_fast.config``).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from ctypes import c_float, c_int, c_int32, c_longlong, c_uint32, c_void_p
from pathlib import Path

from pipespec_fast import config

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
KERNELS = ("skinny_gemm", "quant_gemm", "int8_gemm", "cpu_decoder", "thread_pool", "race",
           "sample")
SOURCES = tuple(SOURCE_DIR / f"{name}.c" for name in KERNELS)
HEADERS = tuple(SOURCE_DIR / f"{name}.h" for name in KERNELS)
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off")
LIBRARY_STEM = "pipespec_cpu"
SKINNY_GEMM_ABI_VERSION = 2  # csrc/skinny_gemm.h
DECODER_ABI_VERSION = 2  # csrc/cpu_decoder.h
DECODER_COMPUTE = {"exact": 0, "int8": 1}  # DECODER_COMPUTE_* (csrc/cpu_decoder.h)
INT8_GEMM_ABI_VERSION = 1  # csrc/int8_gemm.h
ISA_CODES = {"auto": 0, "avx2": 1, "avx512": 2}  # SKINNY_ISA_* in csrc/skinny_gemm.h
ISA_NAMES = {1: "avx2", 2: "avx512"}
INT8_ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512vnni": 3}  # INT8_ISA_* (int8_gemm.h)
INT8_ISA_NAMES = {v: k for k, v in INT8_ISA_CODES.items() if v}


class DecoderLayer(ctypes.Structure):
    """``decoder_layer_t`` (csrc/cpu_decoder.h): one layer's norms and matrices; ``kind`` 0 is
    fp32 rows, else a packed format (``pipespec_fast.cpu.quant``); ``compute`` a
    ``DECODER_COMPUTE`` value (how products on Q4_1 / Q8_0 rows are computed)."""

    _fields_ = [
        ("attn_norm", c_void_p),
        ("ffn_norm", c_void_p),
        ("w", c_void_p * 4),
        ("kind", c_int32 * 4),
        ("compute", c_int32),
    ]


_THREE_POINTERS, _ONE_INT = [c_void_p] * 3, [c_int]
# every function Python calls: name -> (restype, argtypes), as declared in csrc/*.h
SIGNATURES: dict[str, tuple] = {
    "skinny_gemm_abi_version": (c_int, []),
    "skinny_gemm_supported": (c_int, []),
    "skinny_gemm_set_isa": (c_int, [c_int]),
    "skinny_gemm_get_isa": (c_int, []),
    # x, w, y, n, k, m, ldx, nthreads
    "skinny_gemm_f32": (None, _THREE_POINTERS + _ONE_INT * 5),
    "quant_gemm_supported": (c_int, []),
    # x, w, y, n, k, m, ldx, kind, nthreads
    "quant_gemm_f32": (c_int, _THREE_POINTERS + _ONE_INT * 6),
    "quant_gemm_set_long_rows": (c_int, [c_int]),
    "int8_gemm_abi_version": (c_int, []),
    "int8_gemm_set_isa": (c_int, [c_int]),
    "int8_gemm_get_isa": (c_int, []),
    # x, n, k, ldx, q, xs (int8_xblock_t: 16 bytes per block)
    "int8_quantize_rows": (None, [c_void_p] + _ONE_INT * 3 + [c_void_p] * 2),
    # q, xs, w, y, n, k, m, kind, nthreads
    "int8_gemm_q": (c_int, [c_void_p] * 4 + _ONE_INT * 5),
    # x, w, y, n, k, m, ldx, kind, nthreads
    "int8_gemm_f32": (c_int, _THREE_POINTERS + _ONE_INT * 6),
    # out, n, key, index0
    "race_uniforms": (None, [c_void_p, c_longlong, c_uint32, c_longlong]),
    # w, V, key, index0
    "race_argmax": (c_longlong, [c_void_p, c_longlong, c_uint32, c_longlong]),
    # x, n, V, ld, val, idx
    "rows_max": (None, [c_void_p, c_longlong, c_longlong, c_longlong, c_void_p, c_void_p]),
    "sample_set_avx512": (c_int, [c_int]),
    "sample_fast": (c_int, []),
    # x, V, inv_t, p
    "sample_softmax": (c_int, [c_void_p, c_longlong, c_float, c_void_p]),
    # x, V, inv_t, key, index0, p
    "sample_row": (c_longlong, [c_void_p, c_longlong, c_float, c_uint32, c_longlong, c_void_p]),
    # logits, n, V, ld, inv_t, tokens, parents, q, ldq, key_accept, key_residual, p, work,
    # path, next
    "sample_accept_tree": (c_longlong, [c_void_p, c_longlong, c_longlong, c_longlong, c_float,
                                        c_void_p, c_void_p, c_void_p, c_longlong, c_uint32,
                                        c_uint32, c_void_p, c_void_p, c_void_p, c_void_p]),
    "decoder_abi_version": (c_int, []),
    "decoder_supported": (c_int, []),
    "decoder_set_avx512": (c_int, [c_int]),
    # layers, n_layers, x, n, dim, n_heads, n_kv, hd, inter, eps, cosv, sinv, bits, words,
    # k_cache, v_cache, layer_stride, max_len, start, nthreads
    "decoder_layers_f32": (c_int, [c_void_p, c_int, c_void_p] + _ONE_INT * 6 + [c_float]
                           + _THREE_POINTERS + _ONE_INT + [c_void_p] * 2 + [c_longlong]
                           + _ONE_INT * 3),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None  # the loaded library file
_error: str | None = None  # why the library is unavailable (set once tried and failed)
_warned: set[str] = set()


def load() -> ctypes.CDLL | None:
    """The loaded library, built on first use; ``None`` (one warning) if unavailable."""
    lib = _lib
    if lib is not None or _error is not None:
        return lib
    return _load_once()


def available() -> bool:
    """Whether the library is usable here (builds it on first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` if it is available or not tried yet)."""
    return _error


def path() -> Path | None:
    """The file the library was loaded from (``None`` before a successful load)."""
    return _path


def build_dir() -> Path:
    """``<cache_dir>/build`` (``PIPESPEC_CACHE``, default ``~/.cache/pipespec-fast``)."""
    return config.current().cache_dir / "build"


def compiler() -> str | None:
    """The C compiler's path (``PIPESPEC_CC``, default ``gcc``), ``None`` if not found."""
    return shutil.which(config.current().cc)


def cpu_has_avx2_fma() -> bool:
    """x86-64 Linux with avx2 and fma (read from ``/proc/cpuinfo``; the library checks again)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {"avx2", "fma"} <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def cached_path(cc: str) -> Path:
    """Where the build cache keeps the library for compiler ``cc`` and the current sources."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS),
                                     " ".join(CFLAGS).encode(), version.encode()]))
    return build_dir() / f"{LIBRARY_STEM}-{key.hexdigest()[:16]}.so"


# ----------------------------------------------------------------------------- loading


def _load_once() -> ctypes.CDLL | None:
    global _lib, _path, _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        if not config.current().c_kernels:
            _error = "disabled by PIPESPEC_C_KERNELS=0"
            return None
        try:
            if not cpu_has_avx2_fma():
                raise RuntimeError("needs an x86-64 Linux CPU with avx2 and fma")
            cc = compiler()
            if cc is None:
                raise RuntimeError(f"{config.current().cc} not found (set PIPESPEC_CC to a C "
                                   "compiler)")
            _lib, _path = _cached_or_built(cc)
        except Exception as e:  # any failure means "fall back", never crash
            _error = f"{type(e).__name__}: {e}"
            warnings.warn(f"pipespec_fast.cpu: C kernels unavailable, using numpy / torch "
                          f"({_error})", RuntimeWarning, stacklevel=4)
        return _lib


def _cached_or_built(cc: str) -> tuple[ctypes.CDLL, Path]:
    """Load the cached library if it passes :func:`_distrust`, else build a fresh one."""
    target = cached_path(cc)
    folder = target.parent
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    problem = _distrust(folder, directory=True)
    if problem is not None:
        _warn_once(f"{folder} {problem}: the C library is built in a private temporary "
                   f"directory instead (fix: chmod go-w, or set PIPESPEC_CACHE)")
        folder = Path(tempfile.mkdtemp(prefix="pipespec-cpu-"))
        atexit.register(shutil.rmtree, folder, True)
        target = folder / target.name
    elif os.path.lexists(target):
        problem = _verify(target)
        if problem is None:
            return _open(target), target
        _warn_once(f"{target} {problem}: not loaded; rebuilding it")
    return _build(cc, target)


def _build(cc: str, target: Path) -> tuple[ctypes.CDLL, Path]:
    """Compile into a fresh file beside ``target``, load that file, then publish it (with its
    SHA-256) under ``target``'s name by atomic renames. The loaded file is the one just
    compiled, never one read back from the cache."""
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY_STEM}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide a shared cache from other users
        lib = _open(Path(tmp))
        _write_atomic(_checksum_path(target), _sha256(Path(tmp)) + "\n")
        os.replace(tmp, target)  # atomic: concurrent builders each publish a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, target


def _open(file: Path) -> ctypes.CDLL:
    """``CDLL`` (calls release the GIL), every signature declared, ABI versions checked, the
    configured GEMM path selected."""
    lib = ctypes.CDLL(str(file))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.decoder_abi_version() != DECODER_ABI_VERSION:
        raise RuntimeError(f"{file}: decoder ABI version mismatch")
    if lib.skinny_gemm_abi_version() != SKINNY_GEMM_ABI_VERSION:
        raise RuntimeError(f"{file}: ABI version mismatch")
    if lib.int8_gemm_abi_version() != INT8_GEMM_ABI_VERSION:
        raise RuntimeError(f"{file}: int8 GEMM ABI version mismatch")
    if not lib.skinny_gemm_supported():
        raise RuntimeError("the CPU lacks avx2/fma")
    lib.skinny_gemm_set_isa(ISA_CODES[config.current().skinny_isa])
    lib.int8_gemm_set_isa(INT8_ISA_CODES[config.current().int8_isa])
    return lib


# ----------------------------------------------------------------------------- trust


def _distrust(p: Path, directory: bool = False) -> str | None:
    """Why ``p`` may have been written by someone else (``None``: it may not). A file is
    checked without following a symlink; a directory (e.g. a linked cache) is followed."""
    st = os.stat(p) if directory else os.lstat(p)
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (os.getuid(), 0):
        return f"is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by group or others"
    return None


def _verify(file: Path) -> str | None:
    """Why the cached ``file`` must not be loaded (``None``: it may be)."""
    problem = _distrust(file)
    if problem is not None:
        return problem
    checksum = _checksum_path(file)
    if not os.path.lexists(checksum):
        return "has no recorded SHA-256"
    problem = _distrust(checksum)
    if problem is not None:
        return f"has a checksum file that {problem}"
    if checksum.read_text().strip() != _sha256(file):
        return "does not match the SHA-256 recorded when it was built"
    return None


def _checksum_path(file: Path) -> Path:
    return file.with_name(file.name + ".sha256")


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _write_atomic(file: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}-", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"pipespec_fast.cpu: {message}", RuntimeWarning, stacklevel=5)
