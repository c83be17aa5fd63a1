"""Sampled decoding from logits in C (``pipespec_fast.cpu.sample``) against the torch
reference: the tempered softmax to float rounding, the same bits on both C paths, draws and
chain acceptances equal to the reference's on the same inputs, and their distributions by
chi-square (fixed seeds: deterministic)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from pipespec_fast import reference
from pipespec_fast.cpu import race, sample
from pipespec_fast.decoding.sampling import SamplingParams, StageSampler

pytestmark = pytest.mark.skipif(not sample.available(), reason="the C library needs gcc")

P_MIN = 1e-3


@pytest.fixture
def on_path():
    """``on_path(True / False)`` selects the AVX-512F / portable path (skipped where the CPU
    has no AVX-512F: there is one path); the AVX-512F path afterwards."""
    if not sample.set_avx512(True):
        pytest.skip("no AVX-512F here: the portable path is the only one")
    yield sample.set_avx512
    sample.set_avx512(True)


def _logits(n: int, V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("V", [5, 17, 1000, 49152])
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_softmax_is_the_references_to_float_rounding_and_sums_to_one(V, temperature):
    x = _logits(1, V, V)[0]
    x[V // 2] = float("-inf")  # a masked entry gets probability 0
    p = sample.softmax(x, temperature)
    want = reference.probs_from_logits(x, temperature)
    assert p[V // 2] == 0.0
    torch.testing.assert_close(p, want, rtol=2e-5, atol=1e-7)
    assert abs(p.double().sum().item() - 1.0) < 1e-6


def test_rows_without_a_finite_maximum_are_refused():
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(40)
        x[7] = bad
        assert sample.softmax(x, 0.7) is None
        assert sample.draw(x.view(1, -1), 0.7, 1, 2)[0] == -1
    assert sample.softmax(torch.full((40,), float("-inf")), 0.7) is None


@pytest.mark.parametrize("V", [3, 16, 33, 49152])
def test_avx512_and_portable_paths_give_the_same_bits(on_path, V):
    logits = _logits(3, V, 7)
    q = torch.softmax(_logits(2, V, 8), -1)
    out = {}
    for fast in (True, False):
        on_path(fast)
        p = sample.softmax(logits[0], 0.7)
        tok, row = sample.draw(logits[:1], 0.7, 5, 9)
        acc = [sample.accept_chain(logits, 0.7, [1, 2], q, 11, off) for off in range(20)]
        tree = [sample.accept_tree(logits, 0.7, [1, 2], [-1, -1], q, 11, off)
                for off in range(20)]  # two siblings: rejections leave residuals
        out[fast] = (p, tok, row, acc, tree)
    (p1, t1, r1, a1, e1), (p2, t2, r2, a2, e2) = out[True], out[False]
    assert torch.equal(p1, p2) and t1 == t2 and torch.equal(r1, r2)
    for x, y in zip(a1, a2, strict=True):
        assert x[:2] == y[:2] and torch.equal(x[2][: x[0] + 1], y[2][: y[0] + 1])
    for x, y in zip(e1, e2, strict=True):
        assert torch.equal(x[0], y[0]) and x[1:3] == y[1:3] and torch.equal(x[3][0], y[3][0])


def test_exp_is_within_two_ulp_of_float64():
    """Two-entry rows ``[0, a]``: the second probability is ``e^a / (1 + e^a)``; over a grid
    of ``a`` down to -87 the C value is within 2.5e-7 relative of float64's."""
    worst = 0.0
    for a in torch.linspace(-87.0, 0.0, 4001).tolist():
        p = sample.softmax(torch.tensor([0.0, a]), 1.0)
        e = math.exp(float(torch.tensor(a)))
        worst = max(worst, abs(p[1].item() / (e / (1.0 + e)) - 1.0))
    assert worst < 2.5e-7


def test_a_draw_is_the_exponential_race_over_its_own_row():
    logits = _logits(1, 49152, 3)
    for offset in range(5):
        tok, p = sample.draw(logits, 0.7, 42, offset)
        torch.testing.assert_close(p, reference.probs_from_logits(logits[0], 0.7),
                                   rtol=2e-5, atol=1e-7)
        assert tok == race.race_argmax(p, race.key(42, offset, reference.STREAM_DRAFT))


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])
    p = torch.softmax(logits[0] / 0.7, -1)
    counts = torch.zeros(6)
    for offset in range(20000):
        counts[sample.draw(logits, 0.7, 3, offset)[0]] += 1
    assert counts[5] == 0
    assert chisquare(counts[:5].numpy(), (p[:5] * counts.sum()).numpy()).pvalue > P_MIN


@pytest.mark.parametrize("one_hot", [True, False], ids=["one-hot q", "full q"])
def test_chain_acceptance_equals_the_reference_on_its_own_probabilities(one_hot):
    """Given the same verifier rows (the C softmax's), the accept tests, the residual and the
    races are the reference's: the same number accepted, next token and rows."""
    V, n = 300, 3
    for trial in range(200):
        logits = _logits(n + 1, V, trial, scale=1.5)
        drafts = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(trial))
        q = (torch.nn.functional.one_hot(drafts, V).float() if one_hot
             else torch.softmax(_logits(n, V, 1000 + trial, scale=1.5), -1))
        num, nxt, p = sample.accept_chain(logits, 0.8, drafts.tolist(), q, 7, trial)
        probs = torch.stack([sample.softmax(row, 0.8) for row in logits])
        torch.testing.assert_close(p[: num + 1], probs[: num + 1], rtol=0, atol=0)
        _, ref_num, ref_next = reference.stochastic_accept(
            drafts, reference.chain_parents(n), q, probs, 7, trial)
        assert (num, nxt) == (int(ref_num), int(ref_next)), trial


def test_chain_acceptance_emits_the_verifiers_distribution():
    """First two tokens of a 2-draft chain with a draft distribution far from the verifier's:
    the first follows p_0, the second (after the first draft was accepted) p_1."""
    V = 6
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0],
                           [0.0, 1.5, -1.0, 0.3, 0.2, -0.4],
                           [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.05, 0.05, 0.6, 0.1, 0.1, 0.1], [0.4, 0.1, 0.1, 0.1, 0.1, 0.2]])
    p = torch.softmax(logits / 0.9, -1)
    first, second = torch.zeros(V), torch.zeros(V)
    g = torch.Generator().manual_seed(0)
    for offset in range(20000):
        drafts = [int(torch.multinomial(q[0], 1, generator=g)),
                  int(torch.multinomial(q[1], 1, generator=g))]
        num, nxt, _ = sample.accept_chain(logits, 0.9, drafts, q, 1, offset)
        first[drafts[0] if num >= 1 else nxt] += 1
        if num >= 1:
            second[drafts[1] if num == 2 else nxt] += 1
    assert chisquare(first.numpy(), (p[0] * first.sum()).numpy()).pvalue > P_MIN
    assert chisquare(second.numpy(), (p[1] * second.sum()).numpy()).pvalue > P_MIN


def _random_tree(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(-1, c, (1,), generator=g)) if c else -1 for c in range(n)]


@pytest.mark.parametrize("one_hot", [True, False], ids=["one-hot q", "full q"])
def test_tree_acceptance_equals_the_reference_on_its_own_probabilities(one_hot):
    """Siblings tried in index order against the residual, acceptances descending: the
    reference's path, next token and rows, on random trees of 6 nodes."""
    V, n = 200, 6
    for trial in range(200):
        parents = _random_tree(n, trial)
        logits = _logits(n + 1, V, trial, scale=1.5)
        g = torch.Generator().manual_seed(500 + trial)
        q = torch.softmax(_logits(n, V, 2000 + trial, scale=1.5), -1)
        tokens = [int(torch.multinomial(q[c], 1, generator=g)) for c in range(n)]
        if one_hot:
            q = torch.nn.functional.one_hot(torch.tensor(tokens), V).float()
        path, num, nxt, p = sample.accept_tree(logits, 0.8, tokens, parents, q, 3, trial)
        probs = torch.stack([sample.softmax(row, 0.8) for row in logits])
        ref_path, ref_num, ref_next = reference.stochastic_accept(
            torch.tensor(tokens), torch.tensor(parents), q, probs, 3, trial)
        assert (num, nxt) == (int(ref_num), int(ref_next)) and torch.equal(path, ref_path), trial
        for row in [0] + [c + 1 for c in path[:num].tolist()]:
            assert torch.equal(p[row], probs[row]), (trial, row)


@pytest.mark.parametrize("V", [37, 200, 49152])
def test_point_mass_drafts_equal_their_one_hot_rows(V):
    """``q=None`` (a deterministic drafter: no rows built or read) gives the outcome, the
    next token and the rows of the same drafts with one-hot ``q`` rows, bit for bit, on each
    C path this CPU has, chains and trees (siblings: residuals after point masses), drafts in
    a row's 16-wide tail included."""
    paths = (True, False) if sample.set_avx512(True) else (False,)
    for fast in paths:
        sample.set_avx512(fast)
        for trial in range(60):
            n = 1 + trial % 5
            parents = _random_tree(n, trial) if trial % 2 else list(range(-1, n - 1))
            logits = _logits(n + 1, V, trial, scale=1.5)
            g = torch.Generator().manual_seed(trial)
            tokens = [int(t) for t in torch.randint(0, V, (n,), generator=g)]
            if trial % 3 == 0:  # likely drafts (p 0.55-0.95 in their verifier's row, that
                tokens[-1] = V - 1  # after their parent): acceptances, and rejections of a
                for c, x in enumerate(tokens):  # likely draft; the last one in the tail
                    row, want_p = parents[c] + 1, 0.55 + 0.4 * ((trial + c) % 5) / 4
                    rest = torch.cat([logits[row, :x], logits[row, x + 1:]]) / 0.7
                    logits[row, x] = 0.7 * (math.log(want_p / (1 - want_p))
                                            + torch.logsumexp(rest, 0).item())
            q = torch.nn.functional.one_hot(torch.tensor(tokens), V).float()
            want = sample.accept_tree(logits, 0.7, tokens, parents, q, 5, trial)
            got = sample.accept_tree(logits, 0.7, tokens, parents, None, 5, trial)
            assert torch.equal(got[0], want[0]) and got[1:3] == want[1:3], (fast, trial)
            for row in [0] + [c + 1 for c in want[0][: want[1]].tolist()]:
                assert torch.equal(got[3][row], want[3][row]), (fast, trial, row)
            chain = sample.accept_chain(logits, 0.7, tokens, None, 5, trial)
            one_hot = sample.accept_chain(logits, 0.7, tokens, q, 5, trial)
            assert chain[:2] == one_hot[:2], (fast, trial)
    sample.set_avx512(True)


def test_tree_acceptance_emits_the_verifiers_distribution():
    """Three siblings at the root drawn from one draft distribution far from the verifier's:
    the first token follows p_0 (each rejection leaves the residual for the next sibling)."""
    V = 6
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]] + [[0.0] * V] * 3)
    q = torch.tensor([[0.05, 0.05, 0.6, 0.1, 0.1, 0.1]] * 3)
    p = torch.softmax(logits[0] / 0.9, -1)
    counts = torch.zeros(V)
    g = torch.Generator().manual_seed(1)
    for offset in range(20000):
        tokens = [int(torch.multinomial(q[0], 1, generator=g)) for _ in range(3)]
        path, num, nxt, _ = sample.accept_tree(logits, 0.9, tokens, [-1, -1, -1], q, 2, offset)
        counts[tokens[int(path[0])] if num else nxt] += 1
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue > P_MIN


def test_a_non_finite_row_refuses_the_step_even_past_a_rejection():
    logits = _logits(3, 50, 1)
    logits[2, 4] = float("nan")  # a row the acceptance would not visit after a rejection
    q = torch.nn.functional.one_hot(torch.tensor([49, 48]), 50).float()
    assert sample.accept_chain(logits, 0.7, [49, 48], q, 1, 0) is None


def test_a_non_finite_row_refuses_a_tree_step():
    logits = _logits(4, 50, 3)
    logits[3, 0] = float("inf")
    q = torch.nn.functional.one_hot(torch.tensor([49, 48, 47]), 50).float()
    assert sample.accept_tree(logits, 0.7, [49, 48, 47], [-1, 0, -1], q, 1, 0) is None
    s = StageSampler(SamplingParams(temperature=0.7, seed=1), 0)
    out = s.accept_tree(torch.tensor([49, 48, 47]), torch.tensor([-1, 0, -1]), logits, q,
                        on_host=True)
    assert not bool(out[3])


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_greedy_on_the_host_equals_the_acceptance_op(tree):
    """The host paths (a chain compared on the host, a tree through the reference) against
    ``ops.greedy_accept``: all accepted with the bonus token, a rejection, a tie at the
    maximum (the first index wins), a NaN row."""
    V = 40
    s = StageSampler(SamplingParams(), 0)
    for trial in range(60):
        logits = _logits(4, V, trial)
        best = logits.argmax(-1)
        drafts = best[:3].clone()
        if trial % 3 == 1:
            drafts[trial % 2] = (drafts[trial % 2] + 1) % V
        if trial % 5 == 2:  # a tie at the maximum of row 1
            logits[1, (best[1] + 3) % V] = logits[1, best[1]]
        if trial % 7 == 3:
            logits[2, 5] = float("nan")
        parents = torch.tensor([-1, 0, 1]) if tree else None
        if tree:
            fast = s.accept_tree(drafts, parents, logits, None, on_host=True)
            slow = s.accept_tree(drafts, parents, logits, None, on_host=False)
            assert torch.equal(fast[0], slow[0])
            fast, slow = fast[1:4], slow[1:4]
        else:
            fast = s.accept(drafts, logits, None, on_host=True)[:3]
            slow = s.accept(drafts, logits, None, on_host=False)[:3]
        assert [int(x) for x in fast] == [int(x) for x in slow], trial


def test_the_sampler_keeps_torch_where_c_does_not_apply():
    """Top-k, top-p and non-fp32 rows keep the torch ops (tensors back, all rows of ``p``)."""
    logits = _logits(3, 64, 4)
    drafts = torch.tensor([3, 9])
    q = torch.softmax(_logits(2, 64, 5), -1)
    for params in (SamplingParams(temperature=0.7, top_k=5, seed=1),
                   SamplingParams(temperature=0.7, top_p=0.9, seed=1)):
        out = StageSampler(params, 0).accept(drafts, logits, q, on_host=True)
        assert isinstance(out[0], torch.Tensor) and out[3].shape == (3, 64)
    plain = StageSampler(SamplingParams(temperature=0.7, seed=1), 0)
    assert isinstance(plain.accept(drafts, logits.double(), q, on_host=True)[0], torch.Tensor)
    tok, row = StageSampler(SamplingParams(temperature=0.7, top_k=5, seed=1), 0).draw(
        logits[:1])
    assert int((row > 0).sum()) == 5 and row[tok] > 0  # torch's top-k row


def test_bad_arguments_are_refused_naming_them():
    logits = _logits(3, 50, 1)
    q = torch.softmax(_logits(2, 50, 2), -1)
    with pytest.raises(ValueError, match="accept_chain: logits has 3 rows for 1 drafts"):
        sample.accept_chain(logits, 0.7, [1], q[:1], 1, 0)
    with pytest.raises(ValueError, match=r"accept_chain: q expected \[2, 50\]"):
        sample.accept_chain(logits, 0.7, [1, 2], q[:1], 1, 0)
    with pytest.raises(ValueError, match="outside"):
        sample.accept_chain(logits, 0.7, [1, 50], q, 1, 0)
    with pytest.raises(ValueError, match="accept_chain: logits: expected"):
        sample.accept_chain(logits.double(), 0.7, [1, 2], q, 1, 0)
    with pytest.raises(ValueError, match="accept_tree: parents must give"):
        sample.accept_tree(logits, 0.7, [1, 2], [-1, 1], q, 1, 0)


def test_the_sampler_uses_c_on_host_and_torch_for_top_k_and_deferred_reads():
    """``StageSampler.accept`` on host CPU rows returns the C outcome; top-k sampling and a
    deferred-read caller (``on_host=False``) keep the torch acceptance op; so does a CPU
    without the AVX-512F path (``sample.fast``)."""
    logits = _logits(3, 64, 4)
    drafts = torch.tensor([3, 9])
    q = torch.softmax(_logits(2, 64, 5), -1)
    s = StageSampler(SamplingParams(temperature=0.7, seed=1), 0)
    num, nxt, ok, p = s.accept(drafts, logits, q, on_host=True)
    want = sample.accept_chain(logits, 0.7, [3, 9], q, s.seed, 1)
    assert ok and (num, nxt) == want[:2] and isinstance(num, int)
    dev = StageSampler(SamplingParams(temperature=0.7, seed=1), 0).accept(drafts, logits, q)
    assert all(isinstance(t, torch.Tensor) for t in dev[:3])
    top_k = StageSampler(SamplingParams(temperature=0.7, top_k=5, seed=1), 0)
    assert isinstance(top_k.accept(drafts, logits, q, on_host=True)[0], torch.Tensor)
    assert not sample.set_avx512(False)
    try:
        assert not sample.fast()
        assert isinstance(s.accept(drafts, logits, q, on_host=True)[0], torch.Tensor)
    finally:
        sample.set_avx512(True)


@pytest.mark.parametrize("top_k", [None, 20], ids=["C", "torch top-k"])
def test_a_verify_of_point_masses_commits_what_their_one_hot_rows_commit(top_k):
    """``Sequencer.verify`` with :data:`POINT_MASS` rows (all of them: the C path reads none;
    or among real rows: those become one-hot) commits the tokens and keeps the rows that the
    same drafts with their one-hot rows give, on the same random stream; top-k takes torch's
    path, which builds the one-hot rows."""
    from tiny import family

    from pipespec_fast import LlamaStage
    from pipespec_fast.decoding.sampling import POINT_MASS
    from pipespec_fast.decoding.sequence import Sequencer

    model = family(1)[0]
    V = model.config.vocab_size
    params = SamplingParams(temperature=0.8, top_k=top_k, seed=3)
    g = torch.Generator().manual_seed(0)
    real = torch.softmax(torch.randn(V, generator=g), -1)
    for trial in range(12):
        drafts = [int(t) for t in torch.randint(0, V, (1 + trial % 4,), generator=g)]
        one_hot = [torch.nn.functional.one_hot(torch.tensor(t), V).float() for t in drafts]
        marks = [POINT_MASS] * len(drafts)
        if trial % 3 == 2:  # mixed: a real row first
            one_hot[0] = marks[0] = real
        out = []
        for rows in (one_hot, marks):
            s = Sequencer(LlamaStage(model), params, index=0)
            s.start([1, 5, 9, 2, 7, 3])
            s.sampler.rng_offset = trial  # the same step of the same stream for both
            s.verify(list(drafts), list(rows))
            out.append((s.seq, s.span.rows[6:]))
        assert out[0][0] == out[1][0], trial
        assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True)), trial
