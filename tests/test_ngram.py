"""NGramStage: lookup against a brute-force reference (also across rollbacks), the Stage
contract, one-hot rows under every sampling setting, and lossless use as the lowest stage of
a pipeline (greedy identity and the exact sampling distribution by chi-square)."""

import random
import time

import pytest
import torch
from scipy.stats import chisquare
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage, Stage
from pipespec_fast.decoding.sampling import SamplingParams, is_point_mass
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.reference import probs_from_logits
from pipespec_fast.stages.ngram import NGramStage
from pipespec_fast.stages.ngram_index import SuffixIndex


def ref_propose(h, p, max_n=4, min_n=1):
    """Brute force: (token, match_len) proposed to follow h[: p + 1]."""
    for n in range(min(max_n, p + 1), min_n - 1, -1):
        suffix = h[p - n + 1 : p + 1]
        for e in range(p - 1, n - 2, -1):
            if h[e - n + 1 : e + 1] == suffix:
                return h[e + 1], n
    counts = {}
    for i in range(p):
        if h[i] == h[p]:
            counts[h[i + 1]] = counts.get(h[i + 1], 0) + 1
    if counts:
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0], 0
    return h[p], 0


def rows_to_tokens(logits):
    assert logits.dtype == torch.float32
    assert bool(((logits == 0) | (logits == float("-inf"))).all())
    assert bool(((logits == 0).sum(-1) == 1).all())
    return logits.argmax(-1).tolist()


def fed(stage, tokens, last_n=None):
    return stage.forward(torch.tensor(tokens, dtype=torch.int64), last_n=last_n)


def assert_matches_reference(st, max_n, min_n):
    h = st.history
    for p in range(len(h)):
        assert st.propose_at(p) == ref_propose(h, p, max_n, min_n), (h, p)
    # the incremental index equals one built from scratch
    fresh = NGramStage(st.vocab_size, max_len=st.max_len, max_ngram=max_n, min_ngram=min_n)
    if h:
        fed(fresh, h, last_n=1)
    assert st.index.ends == fresh.index.ends and st.index.followers == fresh.index.followers


# ----------------------------------------------------------------------------- lookup


def test_suffix_index_positions_lookup_and_truncation():
    idx = SuffixIndex(1, 3)
    for t in [1, 2, 3, 1, 2]:
        idx.append(t)
    assert idx.ends[1][(1, 2)] == [1, 4] and idx.ends[2][(3, 1, 2)] == [4]
    assert idx.followers == {1: {2: 2}, 2: {3: 1}, 3: {1: 1}}
    assert idx.propose_at(4) == (3, 2)  # "1 2" ended at 1 before; "3 1 2" is new
    assert idx.propose_at(2) == (3, 0)  # nothing before position 2 matches: its own token
    idx.truncate(3)
    fresh = SuffixIndex(1, 3)
    for t in [1, 2, 3]:
        fresh.append(t)
    assert (idx.tokens, idx.ends, idx.followers) == (fresh.tokens, fresh.ends, fresh.followers)
    with pytest.raises(ValueError, match="outside the history"):
        idx.propose_at(3)


def test_suffix_index_bigram_fallback_counts_only_the_prefix():
    idx = SuffixIndex(2, 3)  # no unigrams: a repeated token alone is no match
    for t in [5, 6, 5, 7, 5, 6, 8, 5]:
        idx.append(t)
    assert idx.propose_at(7) == (6, 0)  # 5 was followed by 6 twice, by 7 once
    assert idx.propose_at(2) == (6, 0)  # within [5, 6, 5] only 5 -> 6 counts
    assert idx.propose_at(4) == (6, 0)  # 5 -> 6 once, 5 -> 7 once: the smaller id wins
    assert len(idx) == 8


@pytest.mark.parametrize(
    "max_n,min_n,vocab", [(4, 1, 3), (4, 1, 8), (3, 2, 4), (5, 3, 2), (1, 1, 5)]
)
def test_lookup_matches_brute_force_across_rollbacks(max_n, min_n, vocab):
    rng = random.Random(max_n * 100 + min_n * 10 + vocab)
    for _ in range(8):
        st = NGramStage(vocab, max_len=400, max_ngram=max_n, min_ngram=min_n)
        for _ in range(30):
            if st.cache_len and rng.random() < 0.35:
                st.rollback(
                    rng.randint(0, st.cache_len)
                    if rng.random() < 0.2
                    else max(0, st.cache_len - rng.randint(1, 6))
                )
            else:
                toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
                last_n = rng.randint(1, len(toks)) if rng.random() < 0.7 else None
                out = fed(st, toks, last_n)
                rows = last_n or len(toks)
                h, end = st.history, st.cache_len
                want = [ref_propose(h, p, max_n, min_n) for p in range(end - rows, end)]
                assert rows_to_tokens(out) == [t for t, _ in want]
                assert st.last_proposals == [t for t, _ in want]
                assert st.last_match_len == want[-1][1]
            assert_matches_reference(st, max_n, min_n)


def test_repetitive_prompt_proposes_the_earlier_continuation():
    st = NGramStage(64)
    prompt = [10, 11, 12, 13, 14, 20, 10, 11, 12]
    assert rows_to_tokens(fed(st, prompt, last_n=1)) == [13]
    assert st.last_match_len == 3
    # drafting on by itself follows the earlier occurrence: 13, 14, 20, 10, ...
    seq = [*prompt, 13]
    for _ in range(5):
        seq.append(rows_to_tokens(fed(st, seq[st.cache_len :], last_n=1))[0])
    assert seq[len(prompt) :] == [13, 14, 20, 10, 11, 12]
    # the longest suffix wins over a more recent shorter one
    st.rollback(0)
    fed(st, [1, 2, 3, 9, 5, 3, 7, 1, 2, 3], last_n=1)
    assert st.last_proposals == [9] and st.last_match_len == 3
    assert st.matched == st.proposals == 7


def test_fallbacks_bigram_then_last_token():
    st = NGramStage(16, min_ngram=2)
    fed(st, [4, 5, 4, 6, 4, 5, 7, 4], last_n=1)  # "7 4" is new; 4 was followed by 5 twice
    assert st.last_proposals == [5] and st.last_match_len == 0
    st = NGramStage(16)
    fed(st, [1, 2, 3], last_n=1)  # 3 never seen before, nothing followed it
    assert st.last_proposals == [3] and st.last_match_len == 0
    # all rows: row p only looks at history[: p + 1]
    out = fed(st, [1, 9], last_n=None)
    assert rows_to_tokens(out) == [2, 9] and st.last_match_len == 0


def test_lookup_cost_does_not_grow_with_history():
    rng = random.Random(0)
    st = NGramStage(32000, max_len=40_000)
    fed(st, [rng.randrange(500) for _ in range(30_000)], last_n=1)
    t = time.perf_counter()
    for _ in range(500):
        fed(st, [rng.randrange(500)], last_n=1)
    per_token = (time.perf_counter() - t) / 500
    assert per_token < 2e-3, per_token  # ~tens of µs (a full-history scan would be ms)
    st.rollback(100)  # a long rollback leaves exactly the index of what remains
    assert_matches_reference(st, 4, 1)


# ----------------------------------------------------------------------------- contract


def test_stage_contract_and_errors():
    st = NGramStage(10, max_len=8, name="ng")
    assert isinstance(st, Stage) and st.name == "ng" and st.device == torch.device("cpu")
    assert st.cache_len == 0
    out = fed(st, [1, 2, 3, 1, 2])
    assert out.shape == (5, 10) and st.cache_len == 5
    assert fed(st, [], last_n=0).shape == (0, 10)
    with pytest.raises(ValueError, match="rollback"):
        st.rollback(6)
    with pytest.raises(ValueError, match="rollback"):
        st.rollback(-1)
    with pytest.raises(ValueError, match="overflow"):
        fed(st, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="vocab"):
        fed(st, [10])
    with pytest.raises(ValueError, match="last_n"):
        fed(st, [1], last_n=2)
    with pytest.raises(ValueError, match="1-D"):
        st.forward(torch.tensor([[1]]))
    with pytest.raises(NotImplementedError):
        st.forward(torch.tensor([1, 2]), parents=torch.tensor([-1, 0]))
    with pytest.raises(NotImplementedError):
        st.keep_path(2, torch.tensor([0, 1]), 2, chain=False)
    assert st.cache_len == 5  # failed calls changed nothing
    st.keep_path(2, torch.tensor([0, 1]), 1, chain=True)
    assert st.history == [1, 2, 3]
    st.rollback(3)
    st.rollback(0)
    assert st.history == [] and st.index.ends == [{}, {}, {}, {}] and st.index.followers == {}
    with pytest.raises(ValueError):
        NGramStage(10, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        NGramStage(10, min_ngram=0)


@pytest.mark.parametrize("with_store", [False, True])
def test_propose_is_forwards_argmax_without_the_row(with_store):
    """The greedy fast path: the same token as the argmax of ``forward``'s last row, and the
    same state after it (history, counters, match length), through rollbacks."""
    from pipespec_fast.stages.ngram_store import NGramStore

    rng = random.Random(11)
    vocab = 7
    store = NGramStore([[rng.randrange(vocab) for _ in range(50)] for _ in range(10)], vocab) \
        if with_store else None
    fast, slow = NGramStage(vocab, max_len=400, store=store), NGramStage(vocab, max_len=400,
                                                                         store=store)
    for step in range(150):
        feed = [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 3]))]
        tok = fast.propose(feed)
        assert tok == rows_to_tokens(fed(slow, feed, last_n=1))[0]
        assert (fast.history, fast.last_match_len, fast.proposals, fast.matched) == \
            (slow.history, slow.last_match_len, slow.proposals, slow.matched)
        if step % 17 == 16:
            cut = rng.randrange(len(fast.history) + 1)
            fast.rollback(cut)
            slow.rollback(cut)
    with pytest.raises(ValueError, match="vocab"):
        fast.propose([vocab])
    with pytest.raises(ValueError, match="last_n"):
        fast.propose([])


@pytest.mark.parametrize("temperature, top_k, top_p",
                         [(0.0, None, None), (0.8, None, None), (1.3, 5, 0.9)])
def test_drafting_takes_the_proposal_and_the_row_a_draw_would_give(temperature, top_k, top_p):
    """``Sequencer.draft`` from a model-free stage: ``propose``'s token, and under sampling
    the point-mass marker for the one-hot row a draw from ``forward``'s row gives (exactly),
    without ``forward``."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    fast_stage, slow_stage = NGramStage(16, max_len=64), NGramStage(16, max_len=64)
    slow_stage.propose = None  # (read with getattr: the path through forward and a draw)

    def no_forward(*a, **kw):
        raise AssertionError("forward called")

    fast, slow = Sequencer(fast_stage, params, 0), Sequencer(slow_stage, params, 0)
    for s in (fast, slow):
        s.start(REPETITIVE[:12])
    fast_stage.forward = no_forward
    fast.draft(6)
    slow.draft(6)
    assert fast.seq == slow.seq and len(fast.seq) == 18
    assert fast.span.confident == slow.span.confident
    for tok, a, b in zip(fast.seq[12:], fast.span.rows[12:], slow.span.rows[12:], strict=True):
        if params.greedy:
            assert a is None and b is None
        else:  # the marker stands for exactly the row the draw gives
            assert is_point_mass(a) and torch.equal(b, torch.nn.functional.one_hot(
                torch.tensor(tok), 16).float())


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize(
    "top_k,top_p", [(None, None), (1, None), (3, None), (None, 0.5), (None, 1.0), (4, 0.9)]
)
def test_rows_give_one_hot_probabilities_under_any_sampling(temperature, top_k, top_p):
    st = NGramStage(12)
    out = fed(st, [3, 7, 5, 3, 7], last_n=3)
    want = torch.nn.functional.one_hot(out.argmax(-1), 12).float()
    probs = probs_from_logits(out, temperature, top_k, top_p)
    assert torch.equal(probs, want)


# ----------------------------------------------------------------------------- pipelines

REPETITIVE = [1, 5, 7, 9, 3, 11] * 4


def greedy(stages, prompt, n, mode="pipespec"):
    # fixed windows: every step verifies what it has, so the drafts really are checked (the
    # adaptive, cost-aware window may switch speculation off for tiny models)
    return FastPipeline(stages, mode=mode, adaptive_windows=False).generate(
        prompt, n, ignore_eos=True)


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_ngram_drafter_pipeline_greedy_is_lossless(mode):
    target = LlamaStage(family(1)[0], max_len=256)
    ngram = NGramStage(target.vocab_size)
    for prompt in (REPETITIVE, [2], [4, 8, 15, 16, 23, 42] * 3):
        ref = greedy([target], prompt, 100).token_ids
        res = greedy([ngram, target], prompt, 100, mode)
        assert res.token_ids == ref
    assert res.stage_stats[-1].proposed > 0 and res.stage_stats[-1].accepted > 0
    assert ngram.proposals > 0 and ngram.matched > 0


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_three_stage_ngram_draft_target_is_lossless(mode):
    draft_m, target_m = family(2, noise=0.05)
    draft = LlamaStage(draft_m, name="draft", max_len=256)
    target = LlamaStage(target_m, name="target", max_len=256)
    ngram = NGramStage(target.vocab_size)
    ref = greedy([target], REPETITIVE, 100).token_ids
    res = greedy([ngram, draft, target], REPETITIVE, 100, mode)
    assert res.token_ids == ref
    s0, s1, s2 = res.stage_stats
    assert s0.drafted > 0 and s1.proposed > 0 and s2.accepted > 0
    if mode == "sync":  # deterministic schedule (in pipespec the draft mostly outruns it)
        assert s1.accepted > 0


def exact_joint(target_stage, prompt, temperature):
    """The target's exact distribution over its first two sampled tokens."""
    model = target_stage.model
    V = model.config.vocab_size
    cache = model.new_cache(64)
    p1 = probs_from_logits(model(torch.tensor(prompt), cache, last_n=1)[0], temperature)
    joint = torch.zeros(V, V, dtype=torch.float64)
    base = cache.length
    for a in range(V):
        cache.rollback(base)
        p2 = probs_from_logits(model(torch.tensor([a]), cache)[0], temperature)
        joint[a] = p1[a].double() * p2.double()
    return joint


def test_sampling_with_ngram_drafter_matches_target_distribution():
    target = LlamaStage(family(1, seed=3, vocab=6)[0], max_len=256)
    prompt = [1, 5, 2, 3, 1, 5, 2]  # the drafter proposes 3, then continues the match
    joint = exact_joint(target, prompt, 1.0)
    pipe = FastPipeline([NGramStage(6), target], mode="pipespec")
    counts, accepted = sample_first_two(pipe, prompt, 6, 2000)
    assert accepted > 0  # one-hot drafts were really accepted, not all resampled
    assert chi_square_p(counts, joint.flatten() * 2000) > 1e-3


def sample_first_two(pipe, prompt, V: int, n: int) -> tuple[torch.Tensor, int]:
    """Counts of the first two sampled tokens (flattened ``a * V + b``) over ``n`` seeded
    generations at temperature 1, and the drafts the target accepted in all of them."""
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = 0
    for seed in range(n):
        res = pipe.generate(prompt, 2, temperature=1.0, seed=seed, ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        accepted += res.stage_stats[-1].accepted
    return counts, accepted


def chi_square_p(counts: torch.Tensor, exp: torch.Tensor) -> float:
    """Chi-square p-value of observed ``counts`` against expected counts ``exp`` (rare cells
    pooled so every expected count is >= 5)."""
    order = torch.argsort(exp)
    obs_s, exp_s = counts[order], exp[order]
    rare = exp_s.cumsum(0) < 10
    obs = torch.cat([obs_s[~rare], obs_s[rare].sum().reshape(1)]) if rare.any() else obs_s
    ex = torch.cat([exp_s[~rare], exp_s[rare].sum().reshape(1)]) if rare.any() else exp_s
    return chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue


def _target_ignores_model_drafts(monkeypatch, target_index: int) -> None:
    """The target's window for the model stage below is 0 (as when waiting for it does not
    pay): whatever it verifies comes from its skip-level n-gram drafter."""
    window = Sequencer.window

    def patched(self, max_n, draft_cost_s=0.0):
        return 0 if self.index == target_index else window(self, max_n, draft_cost_s)

    monkeypatch.setattr(Sequencer, "window", patched)


@pytest.mark.parametrize("skip", [True, False])
def test_target_verifies_skip_level_ngram_drafts(monkeypatch, skip):
    draft_m, target_m = family(2, noise=0.05)
    draft = LlamaStage(draft_m, name="draft", max_len=256)
    target = LlamaStage(target_m, name="target", max_len=256)
    ref = greedy([target], REPETITIVE, 100).token_ids
    _target_ignores_model_drafts(monkeypatch, 2)
    pipe = FastPipeline([NGramStage(target.vocab_size), draft, target], adaptive_windows=False,
                        skip_level_drafts=skip)
    res = pipe.generate(REPETITIVE, 100, ignore_eos=True)
    assert res.token_ids == ref
    tgt = res.stage_stats[-1]
    if skip:  # n-gram proposals reached the target directly, and were checked
        assert tgt.proposed > 0 and tgt.accepted > 0
    else:  # without them, a target that does not take the model's drafts decodes alone
        assert tgt.proposed == 0
    # the model stage below, whose drafts the target does not take, is paused: it follows the
    # target's syncs but neither drafts nor verifies past its first steps (not ~100 tokens)
    mid = res.stage_stats[1]
    assert mid.drafted + mid.verify_steps <= 2 * pipe.max_leads[1], mid


def test_sampling_with_skip_level_ngram_drafts_matches_target_distribution(monkeypatch):
    draft_m, target_m = family(2, seed=3, vocab=6, noise=0.3)
    draft = LlamaStage(draft_m, name="draft", max_len=256)
    target = LlamaStage(target_m, name="target", max_len=256)
    prompt = [1, 5, 2, 3, 1, 5, 2]
    joint = exact_joint(target, prompt, 1.0)
    _target_ignores_model_drafts(monkeypatch, 2)
    pipe = FastPipeline([NGramStage(6), draft, target], adaptive_windows=False)
    counts, accepted = sample_first_two(pipe, prompt, 6, 1500)
    assert accepted > 0  # the n-gram's one-hot drafts were really accepted by the target
    assert chi_square_p(counts, joint.flatten() * 1500) > 1e-3
