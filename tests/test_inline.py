"""Inline drafters (``pipespec_fast.pipespec.inline``): an n-gram drafter driven by the stage
above it: filling to a lead, a sync truncating it, its mirror staying an exact copy, and the
topology's wiring of it (inline below the lowest model stage, a skip-level copy with a mirror
of its own for the target)."""

import queue
import random
import threading

import pytest
from tiny import family

from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.pipespec import topology
from pipespec_fast.pipespec.inline import InlineDrafter, InlineStage
from pipespec_fast.pipespec.messages import Sync
from pipespec_fast.pipespec.roles import DrafterWorker, MiddleWorker, TargetWorker
from pipespec_fast.stages import LlamaStage, NGramStage

PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # period 4: the n-gram drafter continues it


def drafter(params=None, prompt=PROMPT) -> InlineStage:
    d = InlineStage(Sequencer(NGramStage(16, max_len=128), params or SamplingParams(), 0))
    d.start(prompt)
    return d


def assert_exact_copy(d: InlineStage, held: int = 0) -> None:
    """The mirror holds the drafter's sequence, flags and rows; its KV invariant holds.
    ``held``: how many positions the stage above holds (either side may have forgotten the
    rows there: nobody verifies those tokens again); past them the rows are the same."""
    span, m = d.s.span, d.mirror.span
    assert m.tokens == span.tokens and m.confident == span.confident
    assert all(a is b for a, b in zip(m.rows[held:], span.rows[held:], strict=True))
    assert d.s.stage.history == span.tokens[: d.s.stage.cache_len]


def test_fill_drafts_up_to_the_lead_and_no_further():
    d = drafter()
    assert isinstance(d, InlineDrafter)
    upper = list(PROMPT)
    d.fill(upper, 3)
    assert d.s.seq == PROMPT + [3, 4, 1]
    assert_exact_copy(d)
    d.fill(upper, 3)  # already 3 ahead
    assert d.s.seq == PROMPT + [3, 4, 1]
    d.fill(upper, 5)
    assert d.s.seq == PROMPT + [3, 4, 1, 2, 3]
    assert d.mirror.offer(upper, 4, with_rows=False) == ([3, 4, 1, 2], None, True)
    d.fill(upper, 0)
    assert len(d.s.seq) == len(PROMPT) + 5
    assert_exact_copy(d)


def test_fill_waits_while_the_drafter_disagrees_with_the_stage_above():
    d = drafter()
    d.fill(list(PROMPT), 3)
    upper = PROMPT + [3, 4, 9]  # the verifier took two drafts, then corrected the third
    d.fill(upper, 3)
    assert d.s.seq == PROMPT + [3, 4, 1]  # nothing: it must adopt the verifier's sequence
    assert d.mirror.offer(upper, 3, with_rows=False) == ([], None, False)


def test_sync_truncates_at_the_divergence_and_the_mirror_follows():
    d = drafter()
    d.fill(list(PROMPT), 3)
    upper = PROMPT + [3, 4, 9]
    c = d.mirror.common_prefix(upper)
    assert c == 12
    d.sync(Sync(c, upper[c:]))
    assert d.s.seq == upper and d.s.stats.rollbacks == 1
    assert d.mirror.agree == 12
    assert_exact_copy(d)
    d.fill(upper, 2)
    # 9 was never seen before: the first proposal is a guess (a fallback, not a match); the
    # second follows the one earlier 9
    assert d.s.seq == upper + [9, 9] and d.s.span.confident[-2:] == [False, True]
    assert d.mirror.offer(upper, 2, with_rows=False) == ([], None, True)  # guesses: none
    assert_exact_copy(d)
    d.sync(Sync(len(upper), []))  # nothing new: nothing changes
    assert d.s.seq == upper + [9, 9] and d.s.stats.rollbacks == 1


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=3)])
def test_mirror_stays_an_exact_copy_through_random_fills_and_syncs(params):
    """A verifier that accepts a random number of drafts and adds a token of its own (a
    correction, sometimes equal to the draft), then syncs, as the target does."""
    rng = random.Random(5)
    d = drafter(params)
    upper = list(PROMPT)
    for _ in range(60):
        d.fill(upper, rng.randint(0, 4))
        assert_exact_copy(d, len(upper))
        rows = d.s.span.rows
        assert all(r is None for r in rows[: len(upper)])  # held above (or adopted): forgotten
        if not params.greedy:  # the drafts past them carry their one-hot rows
            assert all(r is not None for r in rows[len(upper):])
        offered, _, _ = d.mirror.offer(upper, 4, with_rows=not params.greedy)
        upper += offered[: rng.randint(0, len(offered))] + [rng.choice([1, 2, 3, 4, 7])]
        c = d.mirror.common_prefix(upper)
        d.sync(Sync(c, upper[c:]))
        assert d.s.seq[: len(upper)] == upper
        assert_exact_copy(d, len(upper))
    if not params.greedy:
        assert any(r is not None for r in d.mirror.span.rows)  # drafts were offered with rows


def test_a_failure_names_the_inline_stage():
    d = drafter()

    def boom(*a, **kw):
        raise RuntimeError("injected")

    d.s.stage.forward = d.s.stage.propose = boom  # (drafting calls propose)
    with pytest.raises(RuntimeError, match="injected") as ei:
        d.fill(list(PROMPT), 2)
    assert ei.value.pipespec_stage == "0 (ngram)"


# ----------------------------------------------------------------------------- topology


def build(stages, skip=True):
    seqrs = [Sequencer(st, SamplingParams(), i) for i, st in enumerate(stages)]
    k = len(stages)
    settings = topology.PipeSpecSettings([0] + [4] * (k - 1), [6] * (k - 1) + [0],
                                         [None] * k, skip)
    return seqrs, topology.build(seqrs, settings, 64, [None] * k, None, threading.Event(),
                                 queue.SimpleQueue())


def model_stages(k):
    return [LlamaStage(m, name=f"m{i}", max_len=128) for i, m in enumerate(family(k))]


def test_topology_runs_a_model_free_lowest_stage_inline_with_a_skip_level_copy():
    draft, target = model_stages(2)
    ngram = NGramStage(target.vocab_size, max_len=128, max_ngram=3, min_confident_match=2)
    seqrs, (mid, tgt) = build([ngram, draft, target])
    assert type(mid) is MiddleWorker and type(tgt) is TargetWorker
    assert mid.above is tgt and tgt.below is mid and mid.below is None
    assert mid.inline.s is seqrs[0] and tgt.inline is None
    copy = tgt.skip.s.stage
    assert isinstance(copy, NGramStage) and copy is not ngram
    assert (copy.max_ngram, copy.min_confident_match) == (3, 2)
    # each inline drafter keeps its own mirror: the target's follows its own sequence
    prompt = [5, 6, 7, 5, 6, 7, 5]
    mid.inline.start(prompt)
    tgt.skip.start(prompt)
    tgt.skip.fill(prompt, 3)
    assert tgt.skip.mirror is not mid.inline.mirror
    assert tgt.skip.mirror.span.tokens == prompt + [6, 7, 5]
    assert mid.inline.mirror.span.tokens == prompt and mid.inline.s.seq == prompt


def test_topology_without_skip_level_drafts_or_a_model_free_stage():
    draft, target = model_stages(2)
    ngram = NGramStage(target.vocab_size, max_len=128)
    _, (mid, tgt) = build([ngram, draft, target], skip=False)
    assert mid.inline is not None and tgt.skip is None
    _, (tgt,) = build([NGramStage(target.vocab_size, max_len=128), target])
    assert type(tgt) is TargetWorker and tgt.inline is not None and tgt.skip is None
    _, (low, mid, tgt) = build(model_stages(3))
    assert [type(w) for w in (low, mid, tgt)] == [DrafterWorker, MiddleWorker, TargetWorker]
    assert low.above is mid and mid.below is low and tgt.below is mid
