"""Packed weights (``pipespec_fast.cpu.quant``): the C kernel against the torch reference, batch
invariance, bit-exact dequantisation against ggml's layout, and argument errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pipespec_fast.cpu import quant
from pipespec_fast.cpu.quant import F16, Q4_1, Q8_0, PackedWeight
from pipespec_fast.models.convert_gguf import dequantize as numpy_dequantize

needs_kernel = pytest.mark.skipif(
    not quant.available(), reason="packed-weight kernel needs gcc and an AVX-512F/FMA/F16C CPU")
KINDS = [F16, Q4_1, Q8_0]
GGML = {Q4_1: gguf.GGMLQuantizationType.Q4_1, Q8_0: gguf.GGMLQuantizationType.Q8_0}


def packed(m: int, k: int, kind: int, seed: int = 0) -> PackedWeight:
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return PackedWeight(quant.quantize(w, kind), kind, k)


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_reference_dequantize_matches_ggml(kind) -> None:
    """Our blocks are ggml's: gguf's quantiser output decodes identically with ours, with the
    converter's numpy decoder and with gguf's own."""
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    q = gguf.quants.quantize(x, GGML[kind])
    ours = quant.dequantize(torch.from_numpy(np.ascontiguousarray(q)), kind, 96).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q, GGML[kind]))
    np.testing.assert_array_equal(ours, numpy_dequantize(q, int(GGML[kind])))


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_quantize_round_trip_is_close(kind) -> None:
    w = torch.randn(8, 64)
    back = quant.dequantize(quant.quantize(w, kind), kind, 64)
    assert (back - w).abs().max() < (0.35 if kind == Q4_1 else 0.03)


def test_f16_pack_is_exact() -> None:
    w = torch.randn(5, 48).half()
    pw = PackedWeight.from_half(w)
    assert pw.shape == (5, 48) and pw.kind == F16
    assert torch.equal(pw.dequantize(), w.float())


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(1, 32), (7, 64), (13, 96), (64, 160)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 17])
def test_kernel_matches_reference(kind, m, k, n) -> None:
    pw = packed(m, k, kind, seed=m + k)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    ref = x.double() @ pw.dequantize().double().T
    for threads in (1, 2):
        y = quant.packed_linear(x, pw, threads)
        assert y.shape == (n, m) and y.dtype == torch.float32
        assert (y.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(37, 128), (520, 256)])  # the second splits over 2 threads
def test_kernel_is_batch_invariant(kind, m, k) -> None:
    """Row i of any batch equals the 1-row product bit for bit, whatever n and threads."""
    pw = packed(m, k, kind)
    x = torch.randn(12, k)
    singles = torch.cat([quant.packed_linear(x[i : i + 1], pw, 1) for i in range(12)])
    for n in (2, 3, 5, 8, 12):
        for threads in (1, 2):
            assert torch.equal(quant.packed_linear(x[:n], pw, threads), singles[:n])


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(53, 96), (600, 160)])  # tails of panels; the second splits
def test_long_blocks_equal_row_by_row(kind, m, k) -> None:
    """Blocks long enough for the panel path (prefills: n = 65..300, odd tails) give, row for
    row, the bits of the 1-row product (the streaming path), with 1 and 2 threads."""
    pw = packed(m, k, kind, seed=m)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(k))
    singles = torch.cat([quant.packed_linear(x[i : i + 1], pw, 1) for i in range(300)])
    for n in (65, 127, 128, 129, 255, 300):
        for threads in (1, 2):
            assert torch.equal(quant.packed_linear(x[:n], pw, threads), singles[:n])
    rows = torch.tensor([299, 0, 77])  # any row, anywhere in a block
    assert torch.equal(quant.packed_linear(x[rows], pw, 2), singles[rows])


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_both_paths_give_the_same_bits(kind) -> None:
    """The panel path forced down to n = 1 and the streaming path forced up to n = 300 agree
    bit for bit on every n in between (the threshold only moves speed)."""
    pw = packed(100, 128, kind, seed=5)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(6))
    old = quant.set_long_rows(1)
    try:
        panel = [quant.packed_linear(x[:n], pw, 2) for n in range(1, 41)]
        assert quant.set_long_rows(10**6) == 1
        stream = [quant.packed_linear(x[:n], pw, 2) for n in range(1, 41)]
    finally:
        quant.set_long_rows(None)
    assert quant.set_long_rows(old) == old
    assert all(torch.equal(a, b) for a, b in zip(panel, stream, strict=True))


@needs_kernel
def test_kernel_reads_strided_rows() -> None:
    pw = packed(9, 64, Q4_1)
    big = torch.randn(4, 100)
    x = big[:, 10:74]  # row stride 100
    assert torch.equal(quant.packed_linear(x, pw), quant.packed_linear(x.contiguous(), pw))
    long_x = torch.randn(70, 100)[:, 10:74]  # the panel path reads strided rows too
    assert torch.equal(quant.packed_linear(long_x, pw), quant.packed_linear(long_x.contiguous(),
                                                                             pw))


def test_fallback_without_kernel(monkeypatch) -> None:
    monkeypatch.setattr(quant, "_supported", False)
    pw = packed(5, 64, Q8_0)
    x = torch.randn(3, 64)
    assert torch.allclose(quant.packed_linear(x, pw), x @ pw.dequantize().T, atol=1e-5)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="k % 32"):
        quant.row_bytes(Q4_1, 48)
    with pytest.raises(ValueError, match="k % 16"):
        quant.row_bytes(F16, 40)
    with pytest.raises(ValueError, match="unknown packed weight kind"):
        quant.row_bytes(7, 64)
    with pytest.raises(TypeError, match="uint8"):
        PackedWeight(torch.zeros(2, 40), Q4_1, 64)
    with pytest.raises(ValueError, match="rows of 41 bytes, expected 40"):
        PackedWeight(torch.zeros(2, 41, dtype=torch.uint8), Q4_1, 64)
    with pytest.raises(TypeError, match="fp16"):
        PackedWeight.from_half(torch.zeros(2, 32))
    pw = packed(3, 64, Q4_1)
    with pytest.raises(ValueError, match="shapes"):
        quant.packed_linear(torch.zeros(2, 32), pw)
    with pytest.raises(TypeError, match="float32"):
        quant.packed_linear(torch.zeros(2, 64, dtype=torch.float64), pw)
