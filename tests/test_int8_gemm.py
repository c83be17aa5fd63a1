"""The int8-activation GEMM on packed weights (``pipespec_fast.cpu.int8``, ``csrc/int8_gemm.c``):
the quantiser against its torch statement bit for bit, the products against a float64 oracle of
the same arithmetic within the fp32 chain's rounding bound, every path (AVX-512 VNNI, AVX2,
portable C) bit-identical, batch invariance over n, threads and column tails, the error against
the exact fp32 product on SmolLM2's shapes, and argument errors."""

from __future__ import annotations

import pytest
import torch

from pipespec_fast.cpu import int8, quant
from pipespec_fast.cpu import int8_reference as ref
from pipespec_fast.cpu.quant import Q4_1, Q8_0, PackedWeight

pytestmark = pytest.mark.skipif(not int8.available(), reason="the C library is unavailable")
KINDS = [Q4_1, Q8_0]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def packed(m: int, k: int, kind: int, seed: int = 0) -> PackedWeight:
    w = torch.randn(m, k, generator=gen(seed)) * 0.05
    return PackedWeight(quant.quantize(w, kind), kind, k)


def activations(n: int, k: int, seed: int = 1) -> torch.Tensor:
    """Rows with a few large channels, like a transformer's normed activations."""
    x = torch.randn(n, k, generator=gen(seed))
    x[:, torch.randperm(k, generator=gen(seed + 7))[: max(1, k // 64)]] *= 20
    return x


def paths() -> list[str]:
    """The distinct paths this CPU runs (a missing one falls back to the best it has)."""
    got = []
    for name in ("scalar", "avx2", "avx512vnni"):
        isa = int8.set_isa(name)
        if isa not in got:
            got.append(isa)
    int8.set_isa("auto")
    return got


@pytest.fixture
def on_path():
    """``on_path(name)`` selects an int8 path for the rest of the test; auto afterwards."""
    yield int8.set_isa
    int8.set_isa("auto")


def blocks_equal(got: int8.QuantizedRows, want: dict) -> None:
    assert torch.equal(got.q, want["q"])
    for field, value in (("d", got.d()), ("ds", got.ds())):
        assert torch.equal(value.view(torch.int32), want[field].view(torch.int32)), field
    assert torch.equal(got.sums(), want["sum"]) and torch.equal(got.off(), want["off"])


# ----------------------------------------------------------------------------- quantiser


def special_rows(k: int = 128) -> torch.Tensor:
    """Zeros, ties at .5 after scaling, a NaN, an infinity, subnormal-scale and huge blocks."""
    x = torch.randn(6, k, generator=gen(3))
    x[0, :32] = 0.0
    x[0, 32:64] = torch.arange(32) - 15.5  # amax 15.5: x * 127/15.5 lands near many ties
    x[1, :32] = torch.tensor([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5] + [0.25] * 25)  # d = 1
    x[2, 5], x[3, 40] = float("nan"), float("-inf")
    x[4, :32] *= 1e-38  # 1 / d overflows: the block counts as zero
    x[4, 32:64] *= 1e-30
    x[5, :32] *= 3e37
    return x


@pytest.mark.parametrize("source", ["random", "special"])
def test_quantiser_is_its_torch_statement_on_every_path(on_path, source) -> None:
    x = activations(9, 192) if source == "random" else special_rows()
    want = ref.quantize_rows(x)
    for name in paths():
        on_path(name)
        blocks_equal(int8.quantize_rows(x), want)
    assert want["q"].abs().max() <= 127 and (want["sum"] == want["q"].reshape(
        x.shape[0], -1, 32).int().sum(-1)).all()


def test_quantiser_rounds_ties_to_even_and_flags_non_finite_blocks() -> None:
    got = int8.quantize_rows(special_rows())
    assert got.q[1, :7].tolist() == [127, 0, 0, 2, -2, 2, -2]  # d = 1: ties go to even
    assert got.d()[1, 0].item() == 1.0
    assert torch.isnan(got.d()[2, 0]) and torch.isnan(got.d()[3, 1])
    assert (got.q[2, :32] == 0).all() and got.sums()[2, 0] == 0
    assert got.d()[4, 0] == 0 and (got.q[4, :32] == 0).all()
    assert got.d()[4, 1] > 0 and got.q[4, 32:64].abs().max() == 127  # 1e-30 still quantises


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,k", [(1, 17, 32), (3, 40, 96), (8, 33, 576), (11, 64, 1536)])
def test_kernel_within_the_float64_oracle_bound(on_path, kind, n, m, k) -> None:
    """The kernel's fp32 fma chain vs the exact sum of the same terms: inside gamma(N) * sum
    |terms| (N fmas). The bound is far below the int8 arithmetic's distance from the fp32
    product, so a kernel computing anything else (e.g. fp32 products) would fail."""
    pw, x = packed(m, k, kind, seed=k + m), activations(n, k, seed=n)
    xq = ref.quantize_rows(x)
    exact, bound = ref.oracle(xq, pw), ref.error_bound(xq, pw)
    for name in paths():
        on_path(name)
        y = int8.int8_linear(x, pw).double()
        err = (y - exact).abs()
        assert (err <= bound).all(), (name, (err / bound).max().item())
    assert (exact - ref.fp32_product(x, pw)).abs().max() > 20 * bound.max()


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_weight_and_activation_values_are_exact_integers(on_path, kind) -> None:
    """Saturation traps of vpmaddubsw: Q8_0 weights of -128/127 against activations of
    +-127, Q4_1 nibbles of 15; every path must give the oracle within its bound."""
    m, k = 24, 256
    if kind == Q8_0:
        w = torch.full((m, k), 127.0)
        w[::2] = -128.0
        w[:, 1::3] *= -1
        pw = PackedWeight(quant.quantize(w, Q8_0), Q8_0, k)  # d = 1, q = -128 / 127 mixes
    else:
        w = torch.full((m, k), 15.0)
        w[:, ::32] = 0.0  # min 0, d = 1: every other value is nibble 15
        pw = PackedWeight(quant.quantize(w, Q4_1), Q4_1, k)
    x = torch.full((5, k), 1.0)
    x[:, 1::2] = -1.0
    x[1] = -x[1]
    x[2, ::3] = 1.0  # mixed signs
    xq = ref.quantize_rows(x)
    assert xq["q"].abs().max() == 127
    exact, bound = ref.oracle(xq, pw), ref.error_bound(xq, pw)
    ys = []
    for name in paths():
        on_path(name)
        ys.append(int8.int8_linear(x, pw))
        assert ((ys[-1].double() - exact).abs() <= bound).all(), name
    assert all(torch.equal(y, ys[0]) for y in ys)


# ----------------------------------------------------------------------------- bit for bit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(1, 32), (7, 64), (23, 160), (50, 576), (300, 1536)])
def test_every_path_gives_the_same_bits(on_path, kind, m, k) -> None:
    """VNNI == AVX2 == portable C for n = 1..17 (n > 8: the transposed-chunk path), column
    tails of every width and k across chunk boundaries (16 blocks)."""
    pw, x = packed(m, k, kind, seed=m), activations(17, k, seed=k)
    results = {}
    for name in paths():
        on_path(name)
        results[name] = [int8.int8_linear(x[:n], pw, threads=2) for n in (1, 2, 5, 8, 9, 17)]
    first = next(iter(results.values()))
    for name, ys in results.items():
        assert all(torch.equal(a, b) for a, b in zip(ys, first, strict=True)), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(45, 96), (530, 256), (1001, 576)])  # 530, 1001: 2 threads
def test_batch_invariant_over_n_threads_and_split(on_path, kind, m, k) -> None:
    """Row i of every block of n = 1..16 rows equals the 1-row product bit for bit, with 1 or
    2 threads, on every path."""
    pw, x = packed(m, k, kind, seed=m + k), activations(16, k, seed=m)
    for name in paths():
        on_path(name)
        singles = torch.cat([int8.int8_linear(x[i:i + 1], pw, 1) for i in range(16)])
        for n in range(1, 17):
            for threads in (1, 2):
                assert torch.equal(int8.int8_linear(x[:n], pw, threads), singles[:n]), \
                    (name, n, threads)
        assert torch.equal(int8.int8_linear(x[5:16], pw, 2), singles[5:16])  # any row position


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_sized_blocks_are_batch_invariant(kind) -> None:
    """A prompt-sized block (n = 70: nine row groups over chunks of 16 transposed blocks, k
    spanning three chunks) gives each row's 1-row product, on 2 threads."""
    pw, x = packed(200, 1536, kind, seed=5), activations(70, 1536, seed=9)
    block = int8.int8_linear(x, pw, threads=2)
    for i in (0, 7, 8, 33, 62, 69):
        assert torch.equal(block[i:i + 1], int8.int8_linear(x[i:i + 1], pw, 1)), i


def test_quantized_entry_equals_the_one_call_entry() -> None:
    pw, x = packed(70, 192, Q4_1), activations(6, 192)
    xq = int8.quantize_rows(x)
    for threads in (1, 2):
        assert torch.equal(int8.int8_linear_quantized(xq, pw, threads), int8.int8_linear(x, pw))
    pw8 = packed(70, 192, Q8_0)
    assert torch.equal(int8.int8_linear_quantized(xq, pw8), int8.int8_linear(x, pw8))


def test_strided_rows_and_non_finite_rows() -> None:
    pw = packed(33, 64, Q8_0)
    big = activations(4, 100)
    x = big[:, 10:74]  # row stride 100
    assert torch.equal(int8.int8_linear(x, pw), int8.int8_linear(x.contiguous(), pw))
    bad = activations(3, 64)
    bad[1, 3] = float("nan")
    y = int8.int8_linear(bad, pw)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert torch.equal(y[[0, 2]], int8.int8_linear(bad[[0, 2]], pw))


# ----------------------------------------------------------------------------- against fp32


@pytest.mark.parametrize("kind,m,k", [(Q4_1, 576, 576), (Q4_1, 1536, 576), (Q4_1, 576, 1536),
                                      (Q8_0, 49152, 576)])
def test_error_against_the_fp32_product_on_smollm2_shapes(kind, m, k) -> None:
    """Activation quantisation's cost, as a fraction of the output's norm: ~0.5% for Gaussian
    rows (one rounding of amax/127 per block, uniform) and ~1.1% when 1 channel in 64 is 20x
    larger (its block's step grows with it); measured on these shapes, bounded here at 2x."""
    pw = packed(m, k, kind, seed=m)
    for x, limit in ((torch.randn(4, k, generator=gen(k)), 0.008),
                     (activations(4, k, seed=k), 0.025)):
        want = ref.fp32_product(x, pw)
        got = int8.int8_linear(x, pw, threads=2).double()
        rel = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
        assert limit / 4 < rel < limit, rel


# ----------------------------------------------------------------------------- arguments


def test_f16_weights_take_the_exact_packed_path() -> None:
    pw = PackedWeight.from_half(torch.randn(20, 64).half())
    x = activations(3, 64)
    assert not int8.supports(pw) and int8.supports(packed(4, 64, Q4_1))
    assert torch.equal(int8.int8_linear(x, pw), quant.packed_linear(x, pw))
    with pytest.raises(ValueError, match="F16 weights have no int8 path"):
        int8.int8_linear_quantized(int8.quantize_rows(x), pw)


def test_bad_arguments_are_refused() -> None:
    pw = packed(8, 64, Q4_1)
    with pytest.raises(ValueError, match=r"x must be \[n, 64\], got \(2, 32\)"):
        int8.int8_linear(torch.zeros(2, 32), pw)
    with pytest.raises(ValueError, match=r"x must be \[n, 64\], got \(64,\)"):
        int8.int8_linear(torch.zeros(64), pw)
    with pytest.raises(TypeError, match="float32 CPU tensor, got torch.float64"):
        int8.int8_linear(torch.zeros(2, 64, dtype=torch.float64), pw)
    with pytest.raises(TypeError, match="PackedWeight"):
        int8.int8_linear(torch.zeros(2, 64), torch.zeros(8, 64))
    with pytest.raises(ValueError, match="k % 32 == 0"):
        int8.quantize_rows(torch.zeros(2, 48))
    with pytest.raises(TypeError, match="float32"):
        int8.quantize_rows(torch.zeros(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="rows of k=64 for a weight of k=96"):
        int8.int8_linear_quantized(int8.quantize_rows(torch.zeros(1, 64)), packed(2, 96, Q8_0))
    with pytest.raises(ValueError, match="int8 isa: expected one of"):
        int8.set_isa("sse")
    assert int8.int8_linear(torch.zeros(0, 64), pw).shape == (0, 8)


def test_isa_setting_is_applied_when_the_library_loads(configure, monkeypatch) -> None:
    from pipespec_fast.cpu import library

    assert library.load() is not None
    configure(int8_isa="scalar")
    monkeypatch.setattr(library, "_lib", None)  # as a new process would load it
    monkeypatch.setattr(library, "_path", None)
    try:
        assert library.load() is not None and int8.isa() == "scalar"
    finally:
        int8.set_isa("auto")
