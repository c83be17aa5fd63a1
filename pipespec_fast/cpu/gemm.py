"""Batch-invariant skinny fp32 GEMM on CPU: ``y = x @ w.T`` for a few rows of ``x``.

Speculative verification runs the target on ``n`` (2..16) tokens at once; OpenBLAS' sgemm packs
the weights and takes ~3x the time of a 1-row GEMV, although the work is bandwidth-bound. The C
kernel in ``csrc/skinny_gemm.c`` streams every weight row from memory once per call, for all
rows of ``x`` (AVX2 + FMA; an AVX-512 path for n >= 3 where the CPU has it; the threads of one
process-wide pool, ``csrc/thread_pool.c``, split the output columns). Any ``n`` is correct; past
~16 it is still faster than OpenBLAS here.

It is also *batch invariant*: ``y[i, o]`` is computed by the same sequence of float operations
whatever ``n``, ``i``, the thread count, the work split or the ISA path (the order depends on
``k`` only), so row ``i`` of a batched call equals, bit for bit, the 1-row call on ``x[i]``.
Greedy speculative decoding then reproduces the target's own greedy tokens even on near-ties.

The library is compiled lazily on first use with ``gcc`` into ``$PIPESPEC_CACHE/build`` (default
``~/.cache/pipespec-fast/build``), keyed by a hash of the source, the flags and the compiler
version (published by an atomic rename), and loaded with :mod:`ctypes` (``CDLL``: the GIL is
released during the call). The AVX code is enabled per function (``#pragma GCC target``), so the
library loads anywhere and checks avx2/fma itself. If the CPU lacks them, ``gcc`` is missing or
the build fails, :func:`available` is ``False`` (with one warning) and :func:`skinny_linear`
falls back to numpy. ``PIPESPEC_SKINNY=0`` disables it; ``PIPESPEC_SKINNY_ISA=avx2`` forces the
AVX2 path; ``PIPESPEC_CC`` names the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "skinny_gemm.c"
# Compiled into the same library: the weight-compressed GEMM (``quant_gemm``) and the fused
# decoder layer (``cpu_decoder``), which call the skinny GEMM directly.
SOURCES = (SOURCE, SOURCE.parent / "quant_gemm.c", SOURCE.parent / "cpu_decoder.c",
           SOURCE.parent / "thread_pool.c")
HEADERS = (SOURCE.parent / "thread_pool.h",)
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off")
ABI_VERSION = 2
DECODER_ABI_VERSION = 1  # csrc/cpu_decoder.c
DISABLE_ENV = "PIPESPEC_SKINNY"
ISA_ENV = "PIPESPEC_SKINNY_ISA"  # auto (default) | avx2 | avx512; results are the same
_ISAS = {"auto": 0, "avx2": 1, "avx512": 2}
_ISA_NAMES = {1: "avx2", 2: "avx512"}
CACHE_ENV = "PIPESPEC_CACHE"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None  # the loaded library file
_error: str | None = None  # why the library is unavailable (set once tried and failed)


def build_dir() -> Path:
    """``$PIPESPEC_CACHE/build`` if set, else ``~/.cache/pipespec-fast/build``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pipespec-fast"
    return base / "build"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("PIPESPEC_CC", "gcc"))


def _cpu_has_avx2_fma() -> bool:
    """x86-64 with avx2 and fma (read from ``/proc/cpuinfo``; the library checks again)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def _build(cc: str) -> Path:
    """Compile the library into the cache (once per source/flags/compiler) and return its path."""
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    key = hashlib.sha256(
        b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CFLAGS).encode(),
                  version.encode()])
    ).hexdigest()[:16]
    out = build_dir() / f"skinny_gemm-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".skinny_gemm-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, out)  # atomic: concurrent builders each publish a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL (not PyDLL): calls release the GIL
    lib.skinny_gemm_abi_version.restype = ctypes.c_int
    lib.skinny_gemm_abi_version.argtypes = []
    lib.skinny_gemm_supported.restype = ctypes.c_int
    lib.skinny_gemm_supported.argtypes = []
    for name in ("skinny_gemm_set_isa", "skinny_gemm_get_isa"):
        getattr(lib, name).restype = ctypes.c_int
    lib.skinny_gemm_set_isa.argtypes = [ctypes.c_int]
    lib.skinny_gemm_get_isa.argtypes = []
    fn = lib.skinny_gemm_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    lib.quant_gemm_supported.restype = ctypes.c_int
    lib.quant_gemm_supported.argtypes = []
    lib.quant_gemm_f32.restype = ctypes.c_int
    lib.quant_gemm_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
    lib.decoder_supported.restype = ctypes.c_int
    lib.decoder_supported.argtypes = []
    lib.decoder_abi_version.restype = ctypes.c_int
    lib.decoder_abi_version.argtypes = []
    lib.decoder_layers_f32.restype = ctypes.c_int
    lib.decoder_layers_f32.argtypes = (
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 6 +
        [ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 +
        [ctypes.c_longlong] + [ctypes.c_int] * 3)
    if lib.decoder_abi_version() != DECODER_ABI_VERSION:
        raise RuntimeError(f"{path}: decoder ABI version mismatch")
    if lib.skinny_gemm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version mismatch")
    if not lib.skinny_gemm_supported():
        raise RuntimeError("the CPU lacks avx2/fma")
    want = os.environ.get(ISA_ENV, "auto").strip().lower()
    if want not in _ISAS:
        warnings.warn(f"{ISA_ENV}={want!r} is not one of {sorted(_ISAS)}; using auto", stacklevel=4)
        want = "auto"
    lib.skinny_gemm_set_isa(_ISAS[want])
    return lib


def _load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; ``None`` (one warning) if unavailable."""
    global _lib, _path, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        if os.environ.get(DISABLE_ENV, "1") == "0":
            _error = f"disabled by {DISABLE_ENV}=0"
            return None
        try:
            if not _cpu_has_avx2_fma():
                raise RuntimeError("needs an x86-64 Linux CPU with avx2 and fma")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("gcc not found (set PIPESPEC_CC to a C compiler)")
            path = _build(cc)
            _lib, _path = _open(path), path
        except Exception as e:  # any failure means "fall back", never crash
            _error = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"pipespec_fast.cpu.gemm: skinny GEMM kernel unavailable, using numpy ({_error})",
                RuntimeWarning,
                stacklevel=3,
            )
        return _lib


def available() -> bool:
    """Whether the C kernel is usable here (builds it on first call)."""
    return _load() is not None


def isa() -> str | None:
    """The kernel path in use: ``"avx512"`` (n >= 3; AVX2 below) or ``"avx2"``; ``None`` if
    unavailable. Both give bit-identical results; ``PIPESPEC_SKINNY_ISA`` forces one."""
    lib = _load()
    return None if lib is None else _ISA_NAMES.get(lib.skinny_gemm_get_isa())


def set_isa(name: str) -> str | None:
    """Select the kernel path (``"auto"``, ``"avx2"`` or ``"avx512"``; the best available if the
    CPU lacks the one asked for); returns the path now in use. For tests and benchmarks."""
    lib = _load()
    if lib is None:
        return None
    return _ISA_NAMES.get(lib.skinny_gemm_set_isa(_ISAS[name]))


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` if it is available or not tried yet)."""
    return _error


def _numpy_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xn, wn = x.numpy(), w.numpy()
    if xn.shape[0] == 1:
        return torch.from_numpy(np.matmul(wn, xn[0])).unsqueeze(0)
    return torch.from_numpy(np.matmul(xn, wn.T))


def skinny_linear(x: torch.Tensor, w: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``x: [n, k]``, ``w: [m, k]`` (fp32, CPU) -> ``x @ w.T`` as a new ``[n, m]`` tensor.

    Batch invariant (see the module docstring) and reads ``w`` once for all ``n`` rows; tuned for
    ``n <= 16`` but correct for any ``n``. ``threads`` pool threads split the output columns
    (the result does not depend on it). Falls back to numpy when :func:`available` is ``False``.
    """
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_linear: shapes {tuple(x.shape)} @ {tuple(w.shape)}.T")
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        raise TypeError("skinny_linear: float32 only")
    if not (x.is_cpu and w.is_cpu):
        raise ValueError("skinny_linear: CPU tensors only")
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return _numpy_linear(x.detach().contiguous(), w.detach().contiguous())
    if not w.is_contiguous():
        w = w.contiguous()
    n, k = x.shape
    if k and (x.stride(1) != 1 or (n > 1 and x.stride(0) < k)):
        x = x.contiguous()
    m = w.shape[0]
    y = torch.empty((n, m), dtype=torch.float32)
    if n and m:
        ldx = x.stride(0) if n > 1 else k
        lib.skinny_gemm_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), n, k, m, ldx, threads)
    return y
