"""The batch-invariant skinny CPU GEMM (``pipespec_fast.cpu.gemm``, ``csrc/skinny_gemm.c``).

Accuracy against a float64 reference, bit-exact batch invariance (over n, row position, thread
count and ISA path), GIL release through ctypes and concurrent use. Building, loading and the
fallbacks when the library is unavailable: ``tests/test_cpu_library.py``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from pipespec_fast.cpu import gemm as cpu_gemm
from pipespec_fast.cpu import library

K_VALUES = (1, 7, 8, 13, 64, 576, 1536)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Single-threaded numpy references: OpenBLAS threads spinning between calls would fight
    the kernel's pool threads for the cores (slow, not wrong)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def lib():
    if not cpu_gemm.available():
        pytest.skip(f"skinny GEMM unavailable: {library.unavailable_reason()}")
    return library.load()


@pytest.fixture(scope="module")
def isas(lib):
    """The kernel paths this CPU has (results must not depend on the one used)."""
    found = ["avx2"]
    if cpu_gemm.set_isa("avx512") == "avx512":
        found.append("avx512")
    cpu_gemm.set_isa("auto")
    return found


@pytest.fixture
def use_isa(lib):
    """Select a path for one test; back to the best path afterwards."""
    yield cpu_gemm.set_isa
    cpu_gemm.set_isa("auto")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within the rounding-error bound of an 8-lane FMA sum of k/8 steps plus 3 reductions."""
    xd, wd = x.double().numpy(), w.double().numpy()
    ref = xd @ wd.T
    bound = 2 * (x.shape[1] / 8 + 4) * EPS32 * (np.abs(xd) @ np.abs(wd).T) + 1e-30
    err = np.abs(y.double().numpy() - ref)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert (err <= bound).all(), f"max err {err.max():.3g}, bound {bound[err > bound].min():.3g}"


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", [1, 3, 37])
def test_matches_float64_reference(lib, isas, use_isa, k, m):
    x, w = rand(16, k, seed=k), rand(m, k, seed=1000 + m)
    for isa in isas:
        use_isa(isa)
        for n in range(1, 17):
            for threads in (1, 2):
                check_close(cpu_gemm.skinny_linear(x[:n], w, threads), x[:n], w)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_many_output_rows(lib, isas, use_isa, n):
    """A head-sized output (49152 rows: thousands of tiles, split over threads)."""
    x, w = rand(n, 64, seed=n), rand(49152, 64, seed=7)
    for isa in isas:
        use_isa(isa)
        y1 = cpu_gemm.skinny_linear(x, w, 1)
        check_close(y1, x, w)
        assert torch.equal(cpu_gemm.skinny_linear(x, w, 2), y1)


@pytest.mark.parametrize("k", [7, 13, 576, 1536])
@pytest.mark.parametrize("m", [3, 100])
def test_batch_invariance(lib, isas, use_isa, k, m):
    """Row i of any batch equals the 1-row result for x[i], bit for bit, whatever n, the row's
    position, the thread count or the ISA path."""
    x, w = rand(16, k, seed=3 * k + m), rand(m, k, seed=m)
    use_isa("avx2")
    single = [cpu_gemm.skinny_linear(x[i : i + 1], w, 1) for i in range(16)]
    for isa in isas:
        use_isa(isa)
        for threads in (1, 2):
            for i in range(16):
                assert torch.equal(cpu_gemm.skinny_linear(x[i : i + 1], w, threads), single[i])
            for n in range(1, 17):
                for start in {0, 16 - n}:  # a prefix and a suffix (a strided view)
                    y = cpu_gemm.skinny_linear(x[start : start + n], w, threads)
                    for i in range(n):
                        assert torch.equal(y[i : i + 1], single[start + i]), (isa, threads, n, i)


def test_large_n_is_correct_and_invariant(lib, isas, use_isa):
    """n beyond the tuned range (several 256-row groups) is still exact per row."""
    x, w = rand(600, 13, seed=1), rand(30, 13, seed=2)
    use_isa("avx2")
    single = torch.cat([cpu_gemm.skinny_linear(x[i : i + 1], w) for i in range(600)])
    for isa in isas:
        use_isa(isa)
        for n in (17, 40, 257, 600):
            y = cpu_gemm.skinny_linear(x[:n], w, 2)
            check_close(y, x[:n], w)
            assert torch.equal(y, single[:n])


def test_strided_and_noncontiguous_inputs(lib):
    base = rand(8, 600, seed=4)
    x = base[:, 10:586]  # row stride 600, k = 576
    w = rand(576, 100, seed=5).t()  # non-contiguous weight: copied
    y = cpu_gemm.skinny_linear(x, w)
    check_close(y, x, w)
    assert torch.equal(y, cpu_gemm.skinny_linear(x.contiguous(), w.contiguous()))
    assert torch.equal(y[3:4], cpu_gemm.skinny_linear(x[3:4], w.contiguous()))


def test_empty_and_bad_inputs(lib):
    w = rand(5, 8)
    assert cpu_gemm.skinny_linear(torch.empty(0, 8), w).shape == (0, 5)
    assert torch.equal(
        cpu_gemm.skinny_linear(torch.empty(3, 0), torch.empty(5, 0)), torch.zeros(3, 5)
    )
    with pytest.raises(ValueError):
        cpu_gemm.skinny_linear(rand(2, 7), w)
    with pytest.raises(TypeError):
        cpu_gemm.skinny_linear(rand(2, 8).double(), w.double())
    x = rand(2, 8).requires_grad_()
    check_close(cpu_gemm.skinny_linear(x, w), x.detach(), w)


def _raw_call_args(n=16, k=1536, m=2048):
    x, w = rand(n, k, seed=8), rand(m, k, seed=9)
    y = torch.empty(n, m)
    return (x, w, y), (x.data_ptr(), w.data_ptr(), y.data_ptr(), n, k, m, k, 1)


def _ran_while_calling(fn, args, max_calls: int) -> bool:
    """Whether the main thread got to run while another thread was inside ``fn`` calls.

    With a huge switch interval the GIL only changes hands when a thread releases it itself, so
    the main thread, woken by ``started``, can only run before ``done`` if the calls release it.
    """
    started, seen, done = threading.Event(), threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(max_calls):
            fn(*args)
            if seen.is_set():
                break
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=work)
        t.start()
        started.wait()
        ran = not done.is_set()
        seen.set()
        t.join()
    finally:
        sys.setswitchinterval(old)
    return ran


def test_ctypes_call_releases_the_gil(lib):
    keep, args = _raw_call_args()
    assert _ran_while_calling(lib.skinny_gemm_f32, args, max_calls=5000)
    # Control: the same function through PyDLL (GIL held) is detected as blocking.
    held = ctypes.PyDLL(str(library.path())).skinny_gemm_f32
    held.argtypes, held.restype = lib.skinny_gemm_f32.argtypes, None
    keep, args = _raw_call_args(n=2, k=64, m=64)
    assert not _ran_while_calling(held, args, max_calls=200)


def test_concurrent_calls_are_correct(lib):
    xs = [rand(1 + 5 * i, 576, seed=i) for i in range(4)]
    w = rand(960, 576, seed=10)
    expect = [cpu_gemm.skinny_linear(x, w) for x in xs]
    out = [[] for _ in xs]

    def work(i):
        for _ in range(20):
            out[i].append(cpu_gemm.skinny_linear(xs[i], w, 1 + i % 2))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ys in enumerate(out):
        assert len(ys) == 20 and all(torch.equal(y, expect[i]) for y in ys)


def test_forked_child_runs_parallel_calls(lib):
    """A forked child inherits none of the pool's worker threads (only the forking thread
    survives a fork): its multi-threaded calls must still finish, with the same result."""
    x, w = rand(3, 576, seed=3), rand(960, 576, seed=4)
    expect = cpu_gemm.skinny_linear(x, w, 2)  # the pool's workers now exist in this process
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        ok = False
        try:
            ok = all(torch.equal(cpu_gemm.skinny_linear(x, w, 2), expect) for _ in range(5))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a forked child hung in a parallel call")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
