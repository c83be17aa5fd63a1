"""The C exponential race (``pipespec_fast.cpu.race``) against the torch reference: the same
counter-based uniforms bit for bit, the same winners draw by draw, the exact distribution, and
the acceptance op that uses it for its extra token."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from pipespec_fast import ops, reference
from pipespec_fast.cpu import race

pytestmark = pytest.mark.skipif(not race.available(), reason="the C library needs gcc")


def torch_race(w: torch.Tensor, seed: int, offset: int, stream: int, index0: int = 0) -> int:
    idx = torch.arange(index0, index0 + w.shape[0], dtype=torch.int64)
    return int((w / -torch.log(reference.counter_uniform(seed, offset, stream, idx))).argmax())


@pytest.mark.parametrize("seed,offset,stream", [(0, 0, 0), (7, 3, 1), (2**40 + 5, 2**33, 2)])
def test_key_and_uniforms_equal_the_reference_bit_for_bit(seed, offset, stream) -> None:
    key = race.key(seed, offset, stream)
    assert key == reference.rng_key(seed, offset, stream)
    for index0, n in ((0, 1000), (49152 * 7 + 3, 517), (2**32 - 300, 300)):
        idx = torch.arange(index0, index0 + n, dtype=torch.int64)
        want = reference.counter_uniform(seed, offset, stream, idx)
        assert torch.equal(race.uniforms(n, key, index0), want)


@pytest.mark.parametrize("V", [1, 5, 16, 31, 1000, 49152])
def test_race_winners_equal_the_torch_race(V) -> None:
    g = torch.Generator().manual_seed(V)
    rows = 300 if V < 49152 else 40
    for i in range(rows):
        w = torch.softmax(torch.randn(V, generator=g) * 3, -1)
        if i % 3 == 1:  # top-k style zeros
            w[torch.rand(V, generator=g) < 0.7] = 0.0
        seed, offset, stream = i, 2 * i + 1, i % 3
        key = race.key(seed, offset, stream)
        assert race.race_argmax(w, key, 17 * i) == torch_race(w, seed, offset, stream, 17 * i)


def test_race_of_all_zeros_is_index_0_and_bad_input_is_refused() -> None:
    assert race.race_argmax(torch.zeros(40), race.key(1, 2, 0)) == 0
    with pytest.raises(ValueError, match="race_argmax: w must be"):
        race.race_argmax(torch.zeros(4, dtype=torch.float64), 0)


def test_ops_sample_from_probs_equals_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 3000, generator=g) * 2, -1)
    for offset in range(20):
        assert torch.equal(ops.sample_from_probs(probs, 9, offset),
                           reference.sample_from_probs(probs, 9, offset))


def test_ops_sample_from_probs_is_distributed_as_probs() -> None:
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    probs = p.expand(50, -1).contiguous()  # 50 rows per call: 50 independent draws
    counts = torch.zeros(6)
    for offset in range(200):
        counts += torch.bincount(ops.sample_from_probs(probs, 3, offset), minlength=6)
    assert counts[5] == 0
    assert chisquare(counts[:5].numpy(), (p[:5] * counts.sum()).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("parents", [[-1, 0, 1, 2], [-1, -1, 0, 0, 1]])
def test_ops_stochastic_accept_equals_the_reference(parents) -> None:
    g = torch.Generator().manual_seed(len(parents))
    n, V = len(parents), 500
    par = torch.tensor(parents)
    for trial in range(60):
        q = torch.softmax(torch.randn(n, V, generator=g), -1)
        p = torch.softmax(torch.randn(n + 1, V, generator=g), -1)
        toks = torch.multinomial(q, 1, generator=g)[:, 0]
        got = ops.stochastic_accept(toks, par, q, p, 5, trial)
        want = reference.stochastic_accept(toks, par, q, p, 5, trial)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), trial


# ----------------------------------------------------------------------------- rows_max

@pytest.mark.parametrize("n, V", [(1, 49152), (5, 49152), (3, 17), (2, 16), (4, 33), (1, 1),
                                  (7, 100)])
def test_rows_max_equals_torch_max(n, V) -> None:
    g = torch.Generator().manual_seed(n * 1000 + V)
    for x in (torch.randn(n, V, generator=g),
              torch.randint(-3, 3, (n, V), generator=g).float()):  # many ties
        want = x.max(-1)
        got = race.rows_max(x)
        assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)


def test_rows_max_non_finite_rows_and_strided_rows() -> None:
    x = torch.zeros(4, 50)
    x[0, [5, 20, 45]] = 2.0  # ties: the first
    x[1] = float("-inf")  # all -inf: index 0, as torch
    x[2, 40] = float("inf")
    x[3, [44, 30]] = float("nan")  # the first NaN, in the tail and in a full block
    x[3, 10] = 5.0
    got, want = race.rows_max(x), x.max(-1)
    assert torch.equal(got[1], want.indices) and got[1].tolist() == [5, 0, 40, 30]
    assert torch.equal(got[0][:3], want.values[:3]) and got[0][3].isnan()
    wide = torch.randn(3, 80)
    view = wide[:, 7:60]  # row stride 80, unit column stride
    got, want = race.rows_max(view), view.max(-1)
    assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)
    for bad in (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4), wide.t()):
        with pytest.raises(ValueError, match="rows_max"):
            race.rows_max(bad)
    assert race.rows_max(torch.zeros(0, 5))[1].shape == (0,)


def test_sampling_takes_the_c_row_max_for_cpu_fp32_rows_only(monkeypatch) -> None:
    from pipespec_fast.decoding import sampling

    calls = []
    real = race.rows_max
    monkeypatch.setattr(race, "rows_max", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(3, 40)
    for rows, c_path in ((x, True), (x.bfloat16(), False), (x.t().contiguous().t(), False),
                         (x[:, ::2], False)):
        calls.clear()
        got, want = sampling.max_rows(rows), rows.max(-1)
        assert bool(calls) == c_path
        assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)
