"""Skip-level steps in synchronous decoding (``decoding/baselines.py``): a ``full`` step whose
window for the model stages' drafts is 0 has the target verify the model-free lowest stage's
drafts itself, sized by its own policy for those free drafts. Lossless: greedy output equals
the target's own, seeded sampling repeats and follows the target's distribution."""

from __future__ import annotations

import pytest
import torch
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.decoding import baselines
from pipespec_fast.decoding.window import WindowPolicy
from pipespec_fast.stages.ngram import NGramStage

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]


def _count_skip_steps(monkeypatch) -> list[int]:
    """Spy on the skip-level steps: each appends the target's length at its start."""
    seen: list[int] = []
    real = baselines._skip_level_step

    def spy(levels, lean_gamma, start, limit, tree_budget):
        seen.append(start)
        real(levels, lean_gamma, start, limit, tree_budget)

    monkeypatch.setattr(baselines, "_skip_level_step", spy)
    return seen


def _model_drafts_never_pay(monkeypatch, free_at_least_one: bool = False) -> None:
    """Every window for model drafts is 0 (timed or not); free drafts keep their rule, with
    ``free_at_least_one`` verifying at least one wherever the rule decides and one fits: a timed
    rule on a busy machine (beside another test worker) can find that no free draft pays for a
    whole run, and a test of where the drafts go must not depend on that."""
    real = WindowPolicy._evaluate

    def evaluate(self, max_n, cost):
        if not self.free:
            return 0
        w = real(self, max_n, cost)
        return w if w is None or not free_at_least_one else max(w, min(1, max_n))

    monkeypatch.setattr(WindowPolicy, "_evaluate", evaluate)


def _stages(k: int, vocab: int | None = None, noise: float = 0.05, seed: int = 9):
    kw = {} if vocab is None else {"vocab": vocab}
    models = family(k - 1, noise=noise, seed=seed, **kw)
    stages = [LlamaStage(m, name=f"m{i}", max_len=512) for i, m in enumerate(models)]
    return [NGramStage(stages[-1].vocab_size), *stages]


@pytest.mark.parametrize("k,tree_budget,regimes", [(3, 0, False), (3, 0, True), (4, 0, False),
                                                   (3, 6, False)])
def test_greedy_skip_level_steps_give_the_targets_output(monkeypatch, k, tree_budget, regimes):
    """The model stages' drafts never pay: the target verifies the n-gram drafter's itself
    (chains or trees), the model stages in between catch up whenever they are used again,
    and every output equals the target's own."""
    seen = _count_skip_steps(monkeypatch)
    _model_drafts_never_pay(monkeypatch, free_at_least_one=True)
    stages = _stages(k)
    pipe = FastPipeline(stages, mode="sync", tree_budget=tree_budget, regimes=regimes)
    ref = FastPipeline(stages[-1:])
    accepted = 0
    for prompt in (PROMPT, [2, 7, 2, 7, 2, 7, 2]):
        res = pipe.generate(prompt, 60, ignore_eos=True)
        assert res.token_ids == ref.generate(prompt, 60, ignore_eos=True).token_ids
        accepted += res.stage_stats[-1].accepted
    # (a step alone now and then times L(1) for the full window; the bandit runs lean epochs)
    assert len(seen) > 10
    assert accepted > 0  # the n-gram drafter's drafts reached the target


def test_no_skip_level_steps_when_turned_off_or_the_drafts_pay(monkeypatch):
    seen = _count_skip_steps(monkeypatch)
    stages = _stages(3, noise=0.0)  # a draft equal to the target: its window never closes
    pipe = FastPipeline(stages, mode="sync", regimes=False)
    pipe.generate(PROMPT, 40, temperature=0.8, seed=1, ignore_eos=True)
    assert seen == []
    _model_drafts_never_pay(monkeypatch)
    off = FastPipeline(stages, mode="sync", regimes=False, skip_level_drafts=False)
    res = off.generate(PROMPT, 40, temperature=0.8, seed=1, ignore_eos=True)
    # decoded alone but for the window's explorations (one draft after 8, then 16 steps)
    assert seen == [] and res.stage_stats[-1].proposed <= 2


def test_seeded_skip_level_steps_repeat_and_follow_the_targets_distribution(monkeypatch):
    """Seeded sync over [n-gram -> draft -> target] where only skip-level steps run: the same
    seed gives the same tokens, and the first two tokens follow the target's joint
    distribution (chi-square over 1500 seeds)."""
    from test_ngram import chi_square_p
    from test_tree_decoding import exact_joint

    from pipespec_fast.decoding.sampling import SamplingParams

    seen = _count_skip_steps(monkeypatch)
    _model_drafts_never_pay(monkeypatch)
    V, n = 6, 1500
    stages = _stages(3, vocab=V, noise=0.3, seed=7)
    prompt = [1, 5, 2, 3, 1, 5, 2]
    joint = exact_joint(stages[-1], prompt, SamplingParams(0.9))
    pipe = FastPipeline(stages, mode="sync")
    first = pipe.generate(prompt, 30, temperature=0.9, seed=5, ignore_eos=True).token_ids
    assert pipe.generate(prompt, 30, temperature=0.9, seed=5, ignore_eos=True).token_ids == first
    counts = torch.zeros(V * V, dtype=torch.float64)
    seen.clear()
    for seed in range(n):
        a, b = pipe.generate(prompt, 2, temperature=0.9, seed=seed, ignore_eos=True).token_ids
        counts[a * V + b] += 1
    assert len(seen) == n  # each generation's first step (its second has no room for drafts)
    assert chi_square_p(counts, joint.flatten() * n) > 1e-3


def test_free_drafts_have_no_acceptance_floor_without_timings():
    """Timing-free windows (seeded sync): model drafts below an acceptance of 0.5 are not
    verified; free ones are, by the fixed cost line alone (a = 4/11 here)."""
    lat = {2: (0.001, 1.0), 4: (0.0011, 1.0)}
    costly, free = WindowPolicy(timed=False), WindowPolicy(timed=False, free=True)
    for p in (costly, free):
        p.set_state(3.0, 6.0, lat)
    assert costly.plan(6) == 0
    assert free.plan(6) == 2  # 1.49 / 1.16 beats 1.36 / 1.08 and 1.54 / 1.24


def test_no_skip_level_step_while_the_full_window_times_its_step_alone(monkeypatch):
    """A window of 0 that only asks for a step alone to time L(1) (a plan of ``None``) is that
    step, under the full hierarchy's policy: a skip-level step would leave it untimed, and
    the full hierarchy's window at 0 for good."""
    seen = _count_skip_steps(monkeypatch)
    real = WindowPolicy._evaluate
    monkeypatch.setattr(WindowPolicy, "_evaluate",
                        lambda self, max_n, cost: real(self, max_n, cost) if self.free else None)
    pipe = FastPipeline(_stages(3), mode="sync", regimes=False)
    res = pipe.generate(PROMPT, 30, ignore_eos=True)
    assert seen == [] and res.stage_stats[-1].proposed == 0  # every step alone


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_rewind_leaves_the_last_token_uncached(extra):
    """``Sequencer.rewind(n)`` keeps ``n`` tokens with at most ``n - 1`` of them cached (a
    forward feeds at least one token), whether the cache held ``n - 1``, ``n`` or ``n + 1``
    before; the drafter then proposes after them."""
    from pipespec_fast.decoding.sampling import SamplingParams
    from pipespec_fast.decoding.sequence import Sequencer

    s = Sequencer(NGramStage(64), SamplingParams(0.0), index=0)
    s.start([1, 2, 3, 1, 2], prefill=True)
    s.draft(3)
    assert len(s.seq) == 8 and s.stage.cache_len == 7
    s.stage.rollback(4 + extra)
    s.rewind(5)
    assert s.seq == [1, 2, 3, 1, 2] and s.stage.cache_len == 4
    assert s.draft(1) == 1 and s.seq[5] == 3  # it proposes after them: 1, 2 -> 3
    s.rewind(0)
    assert s.seq == [] and s.stage.cache_len == 0
