"""The regime bandit (``decoding/regime.py``) and the pipeline's memory of it between
generations (``decoding/memory.py``): which draft sources the target uses, judged by measured
tokens per second, with greedy output equal to the target's own whatever it picks."""

from __future__ import annotations

import pytest
import torch
from test_tree_decoding import _slow_forward
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.decoding.regime import ALONE, FULL, LEAN, Regimes, arms_for
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.stats import step_overhead_s
from pipespec_fast.stages.ngram import NGramStage

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]


def run_epochs(reg: Regimes, rates: dict[str, float], epochs: int,
               per_step: dict[str, int] | None = None) -> list[str]:
    """Drive ``reg`` with a clock on which regime ``a`` commits ``rates[a]`` tokens per second,
    ``per_step[a]`` tokens per step (default: one alone, 16 with drafts, so that the bandit's
    bound of tokens per step times ``alone``'s rate leaves the rates as given); returns the
    regime of each epoch."""
    now, ran = 0.0, []
    reg.begin(now)
    for _ in range(epochs):
        ran.append(reg.arm)
        done = sum(reg.epochs.values())
        k = (per_step or {}).get(reg.arm, 1 if reg.arm == ALONE else 16)
        while sum(reg.epochs.values()) == done:  # its settling steps, then the epoch's
            now += k / rates[reg.arm]
            reg.note_step(k, now)
    return ran


def test_each_regime_is_tried_then_the_fastest_runs_and_the_others_are_retried_ever_less():
    reg = Regimes((FULL, LEAN, ALONE))
    ran = run_epochs(reg, {FULL: 100.0, LEAN: 300.0, ALONE: 200.0}, 120)
    assert ran[:3] == [FULL, LEAN, ALONE] and reg.best == LEAN
    late = ran[60:]
    assert late.count(LEAN) > 0.85 * len(late)
    # explorations of the losers thin out: each loses again, and its wait doubles to the cap
    assert late.count(FULL) <= 3 and late.count(ALONE) <= 3 and ran[3:].count(FULL) >= 1
    assert reg.wait[FULL] == Regimes.MAX_WAIT
    summary = reg.summary()
    assert summary["best"] == LEAN and summary["tokens_per_s"][LEAN] == pytest.approx(300.0)


def test_a_regime_that_becomes_faster_takes_over_at_its_next_exploration():
    reg = Regimes((FULL, ALONE))
    run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 20)
    assert reg.best == ALONE
    # the drafts got good: a regime that lost by far is retried after up to MAX_WAIT epochs
    ran = run_epochs(reg, {FULL: 400.0, ALONE: 200.0}, 3 * Regimes.MAX_WAIT)
    assert reg.best == FULL and ran[-20:].count(FULL) >= 18


def test_the_margin_keeps_the_best_when_the_challenger_is_barely_faster():
    reg = Regimes((FULL, ALONE))
    ran = run_epochs(reg, {FULL: 200.0, ALONE: 201.0}, 60)
    assert reg.best == FULL and ran[10:].count(FULL) > 0.8 * 50


@pytest.mark.parametrize("per_step,best", [(1, ALONE), (2, FULL)])
def test_a_regime_of_one_token_per_step_is_never_faster_than_alone(per_step, best):
    """Steps of the full hierarchy measured 30% faster than steps alone are the clock's
    noise when each commits one token (verifying drafts never costs less than a step alone):
    judged at most as fast as ``alone``, ``full`` does not take over, and its retries lose.
    The same steps committing 2 tokens each are a real lead."""
    reg = Regimes((FULL, ALONE))
    ran = run_epochs(reg, {FULL: 260.0 * per_step, ALONE: 200.0}, 40, {FULL: per_step})
    assert reg.best == best
    assert reg.tokens_per_step(FULL) == pytest.approx(per_step)
    assert reg.tokens_per_step(ALONE) == pytest.approx(1.0)
    assert reg.rate(FULL) == pytest.approx(260.0 * per_step)  # measured, as it was
    assert reg.rates()[FULL] == pytest.approx(min(260.0, 200.0) * per_step)
    assert reg.summary()["tokens_per_step"] == {FULL: pytest.approx(per_step), ALONE: 1.0}
    if best == ALONE:
        assert ran[1:3] == [ALONE, ALONE] and ran[10:].count(ALONE) > 0.8 * 30
        # retried, and lost again: the wait doubled twice (displaced, then its retry)
        assert ran[3:].count(FULL) >= 1 and reg.wait[FULL] >= 4 * Regimes.FIRST_WAIT
        # the drafts got good (3 tokens a step at the same step time): it wins the lead back
        ran = run_epochs(reg, {FULL: 780.0, ALONE: 200.0}, 3 * Regimes.MAX_WAIT, {FULL: 3})
        assert reg.best == FULL and ran[-10:] == [FULL] * 10
    else:
        assert ran[-10:] == [FULL] * 10


def test_the_bound_needs_an_alone_arm():
    """Without ``alone`` (a hierarchy with an n-gram drafter: ``full`` against ``lean``) the
    rates are judged as measured, whatever the tokens per step."""
    reg = Regimes((FULL, LEAN))
    run_epochs(reg, {FULL: 200.0, LEAN: 260.0}, 10, {FULL: 1, LEAN: 1})
    assert reg.rates() == {FULL: pytest.approx(200.0), LEAN: pytest.approx(260.0)}
    assert reg.best == LEAN


def test_arms_for_each_hierarchy():
    assert arms_for("ar", [True, False, False], True) == ()
    assert arms_for("sync", [False], True) == ()
    # model-free drafters only: the window decides alone (no drafter thread to price)
    assert arms_for("sync", [True, False], True) == ()  # n-gram -> target
    assert arms_for("pipespec", [True, True, False], True) == ()
    assert arms_for("sync", [False, False], True) == (FULL, ALONE)  # draft -> target
    assert arms_for("pipespec", [True, False, False, False], True) == (FULL, LEAN)
    assert arms_for("sync", [True, False, False], False) == (FULL, LEAN)
    assert arms_for("pipespec", [True, False, False], True) == (FULL, LEAN)
    # PipeSpec's lean regime is the target's skip-level drafts: not without them
    assert arms_for("pipespec", [True, False, False], False) == (FULL, ALONE)
    with pytest.raises(ValueError, match="arms must start with 'full'"):
        Regimes((ALONE, FULL))


def _hierarchy(draft_sleep_s: float = 0.0, target_sleep_s: float = 0.0, noise: float = 0.05,
               monkeypatch=None):
    draft_m, target_m = family(2, noise=noise, seed=4)
    draft = LlamaStage(draft_m, name="draft", max_len=512)
    target = LlamaStage(target_m, name="target", max_len=512)
    if draft_sleep_s:
        _slow_forward(monkeypatch, draft, draft_sleep_s)
    if target_sleep_s:
        _slow_forward(monkeypatch, target, target_sleep_s)
    return [NGramStage(target.vocab_size), draft, target]


def _steps(pipe: FastPipeline, prompts, n: int, skip: int = 0) -> dict[str, int]:
    """The target's steps per regime over generations of ``n`` tokens after ``prompts``,
    the first ``skip`` generations (the bandit's first tries) left out; every output is
    checked against the target's own."""
    ref = FastPipeline(pipe.stages[-1:])
    steps: dict[str, int] = {}
    for i, p in enumerate(prompts):
        res = pipe.generate(p, n, ignore_eos=True)
        assert res.token_ids == ref.generate(p, n, ignore_eos=True).token_ids
        for arm, k in res.stats["regimes"]["steps"].items():
            steps[arm] = steps.get(arm, 0) + k * (i >= skip)
    return steps


@pytest.mark.parametrize("mode,most", [("sync", 0.25), ("pipespec", 0.3)])
def test_a_draft_that_only_costs_is_left_out(mode, most, monkeypatch):
    """A draft whose every forward takes 20 ms, under a target of ~1 ms, makes the full
    hierarchy the slower regime: after its first tries the target runs lean, and every output
    equals the target's own. (``most``: 5-17% of the target's steps ran the full hierarchy,
    its retries, beside 3 busy loops on 2 cores; a bandit choosing at random would give a
    half.) The first two generations are left out: in PipeSpec the target verifies its
    skip-level n-gram drafts while the sleeping draft has none ready, so ``full`` at times
    measures as fast as ``lean`` (79-3192 against 1341-3727 tokens/s) and wins a
    confirmation epoch; it ran up to 31% of the second generation's steps."""
    pipe = FastPipeline(_hierarchy(draft_sleep_s=0.02, monkeypatch=monkeypatch), mode=mode)
    steps = _steps(pipe, [PROMPT, PROMPT[::-1], PROMPT[5:], PROMPT[::2]], 150, skip=2)
    assert steps.get(FULL, 0) < most * sum(steps.values()), steps


def test_drafts_that_pay_keep_the_full_hierarchy(monkeypatch):
    """A target whose forwards take 15 ms, whatever their size, and a draft that is nearly the
    target (noise 0.02): speculation with the draft beats both other regimes."""
    stages = _hierarchy(target_sleep_s=0.015, noise=0.02, monkeypatch=monkeypatch)
    pipe = FastPipeline(stages, mode="sync")
    steps = _steps(pipe, [PROMPT, PROMPT[::-1], PROMPT[5:], PROMPT[::2]], 150, skip=2)
    assert steps.get(FULL, 0) > 0.6 * sum(steps.values()), steps


def test_the_bandit_and_windows_carry_over_between_generations_and_can_be_forgotten():
    stages = _hierarchy()
    pipe = FastPipeline(stages, mode="sync")
    pipe.generate(PROMPT, 60, ignore_eos=True)
    first = pipe.last_result.stats["regimes"]
    res = pipe.generate(PROMPT, 60, ignore_eos=True)
    second = res.stats["regimes"]
    assert sum(second["epochs"].values()) > sum(first["epochs"].values())  # one bandit
    # steps: this generation's only (one per target step)
    assert sum(second["steps"].values()) == res.stage_stats[-1].verify_steps
    # sampling parameters have a bandit of their own
    pipe.generate(PROMPT, 60, ignore_eos=True, temperature=0.5)
    assert sum(pipe.last_result.stats["regimes"]["epochs"].values()) < sum(
        second["epochs"].values())
    pipe.forget_measurements()
    pipe.generate(PROMPT, 24, ignore_eos=True)
    fresh = pipe.last_result.stats["regimes"]
    # from scratch: only the regimes tried since (in their first-try order) have rates
    assert sum(fresh["epochs"].values()) <= 2
    assert list(fresh["tokens_per_s"]) == [FULL, LEAN, ALONE][: len(fresh["tokens_per_s"])]
    assert fresh["epochs"] != second["epochs"]


def test_seeded_sync_has_no_bandit_and_repeats_after_other_generations():
    """A seeded sync generation's draws must not depend on a clock or on what ran before."""
    pipe = FastPipeline(_hierarchy(noise=0.3), mode="sync")
    first = pipe.generate(PROMPT, 60, temperature=0.9, seed=3, ignore_eos=True)
    assert "regimes" not in first.stats
    for _ in range(3):
        pipe.generate(PROMPT, 60, ignore_eos=True)  # greedy: a bandit of its own
        pipe.generate(PROMPT, 60, temperature=0.9, ignore_eos=True)  # unseeded: timed
    again = pipe.generate(PROMPT, 60, temperature=0.9, seed=3, ignore_eos=True)
    assert again.token_ids == first.token_ids


def test_regime_epochs_restart_at_each_generation():
    reg = Regimes((FULL, ALONE))
    reg.begin(0.0)
    for i in range(5):
        reg.note_step(1, 0.001 * (i + 1))
    reg.begin(1.0)  # a new generation: the partial epoch is dropped ...
    assert reg.steps == {}
    n = Regimes.SETTLE_STEPS + Regimes.EPOCH_STEPS - 1
    for i in range(n):  # ... so the settling steps and 11 more do not end an epoch
        reg.note_step(1, 1.0 + 0.5 * (i < Regimes.SETTLE_STEPS) + 0.001 * i)
    assert reg.epochs == {} and reg.steps == {FULL: n}
    t_settled = 1.5 + 0.001 * (Regimes.SETTLE_STEPS - 1)
    reg.note_step(1, t_settled + 0.1)
    # 12 timed tokens over 0.1 s: the settling steps' slow catch-up (0.5 s) is not counted
    assert reg.epochs == {FULL: 1} and reg.rate(FULL) == pytest.approx(12 / 0.1)


def _check_per_regime_stats(pipe: FastPipeline, res) -> None:
    """The target's figures per regime add up to its own, one verify per step of the regime,
    and the per-regime prediction weighs each regime by the tokens it committed."""
    target = res.stage_stats[-1]
    steps = res.stats["regimes"]["steps"]
    assert {a: sub.verify_steps for a, sub in target.by_arm.items()} == steps
    for key in ("verify_steps", "accepted", "proposed", "rejected", "tree_steps"):
        assert sum(getattr(sub, key) for sub in target.by_arm.values()) == getattr(target, key)
    assert sum(sub.forwards for sub in target.by_arm.values()) < target.forwards  # + prefill
    pred = pipe.predict_regimes(res)
    assert pred.tokens == {a: float(sub.accepted + sub.verify_steps)
                           for a, sub in target.by_arm.items()}
    assert sum(pred.tokens.values()) == len(res.token_ids) and all(
        r > 0 for r in pred.rates.values())
    seconds = sum(n / pred.rates[a] for a, n in pred.tokens.items() if n)
    assert pred.tokens_per_s == pytest.approx(len(res.token_ids) / seconds)
    if ALONE in pred.rates:  # the target alone: 1 / (L(1) + its host time per step)
        lat = sorted(target.by_arm[ALONE].forward_latency[1])
        o = step_overhead_s(target, res.stats["seconds"]) if res.stats["mode"] == "pipespec" \
            else 0.0
        assert pred.rates[ALONE] == pytest.approx(1 / (lat[len(lat) // 2] + o))


def _cycle_regimes(monkeypatch, arms: list[str], epoch_steps: int) -> None:
    """Every bandit runs ``arms`` in turn (skipping those it does not have), one epoch of
    ``epoch_steps`` target steps each, whatever the clock says."""
    monkeypatch.setattr(Regimes, "EPOCH_STEPS", epoch_steps)
    monkeypatch.setattr(Regimes, "SETTLE_STEPS", 0)

    def choose(self, ran):
        own = [a for a in arms if a in self.arms]
        return own[(own.index(ran) + 1) % len(own)]

    monkeypatch.setattr(Regimes, "_choose", choose)
    monkeypatch.setattr(Regimes, "_length", lambda self, arm: self.EPOCH_STEPS)


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
@pytest.mark.parametrize("k,ngram,tree_budget", [(2, False, 0), (3, True, 0), (4, True, 0),
                                                 (3, True, 6)])
def test_greedy_output_is_the_targets_through_every_regime_switch(monkeypatch, mode, k, ngram,
                                                                  tree_budget):
    """The regimes switch every 3 steps in the order full, lean, alone, lean, full (the stages
    left out catch up when used again): every output equals the target's own."""
    _cycle_regimes(monkeypatch, [FULL, LEAN, ALONE, LEAN], 3)
    models = family(k - ngram, noise=0.05, seed=9)
    stages = [LlamaStage(m, name=f"m{i}", max_len=512) for i, m in enumerate(models)]
    if ngram:
        stages = [NGramStage(stages[-1].vocab_size)] + stages
    pipe = FastPipeline(stages, mode=mode, tree_budget=tree_budget)
    ref = FastPipeline(stages[-1:])
    ran: set[str] = set()
    for prompt in (PROMPT, PROMPT[::-1], [2, 7, 2, 7, 2, 7, 2]):
        res = pipe.generate(prompt, 80, ignore_eos=True)
        assert res.token_ids == ref.generate(prompt, 80, ignore_eos=True).token_ids
        ran |= set(res.stats["regimes"]["steps"])
        _check_per_regime_stats(pipe, res)
    assert ran == set(pipe.last_result.stats["regimes"]["epochs"])  # every arm it has ran
    assert ran == ({FULL, LEAN} if ngram else {FULL, ALONE})


@pytest.mark.parametrize("ngram", [True, False])
def test_sampling_is_the_targets_distribution_through_regime_switches(monkeypatch, ngram):
    """A regime switch at every step (PipeSpec; full and lean in turn under an n-gram
    drafter, k = 3, full and alone without it, k = 2): the first two tokens follow the
    target's joint distribution (chi-square)."""
    from test_ngram import chi_square_p
    from test_tree_decoding import exact_joint

    _cycle_regimes(monkeypatch, [FULL, LEAN, ALONE], 1)
    V, n = 6, 1500
    models = family(2, seed=7, vocab=V, noise=0.3)
    stages = [LlamaStage(m, name=f"m{i}", max_len=64) for i, m in enumerate(models)]
    prompt = [1, 5, 2, 3, 1, 5, 2]
    params = SamplingParams(0.9)
    joint = exact_joint(stages[-1], prompt, params)
    pipe = FastPipeline([NGramStage(V)] * ngram + stages, mode="pipespec")
    counts = torch.zeros(V * V, dtype=torch.float64)
    for seed in range(n):
        a, b = pipe.generate(prompt, 2, temperature=0.9, seed=seed, ignore_eos=True).token_ids
        counts[a * V + b] += 1
    assert set(pipe.last_result.stats["regimes"]["epochs"]) == (
        {FULL, LEAN} if ngram else {FULL, ALONE})
    exp = joint.flatten() * n
    assert chi_square_p(counts, exp) > 1e-3


@pytest.mark.parametrize("slow,wait", [(100.0, 16), (190.0, 8)])
def test_a_regime_far_behind_waits_longer(slow, wait):
    """A regime that loses a comparison, the first one included (the best it displaced),
    waits 4x the first wait when it was over 15% slower, 2x when 5% slower; a retry that
    loses again multiplies that wait again, up to MAX_WAIT."""
    reg = Regimes((FULL, ALONE))
    ran = run_epochs(reg, {FULL: slow, ALONE: 200.0}, 3 + wait)
    # ALONE, ahead after its first try, runs once more before it takes over
    assert ran[:3] == [FULL, ALONE, ALONE] and reg.best == ALONE
    # the wait counts from the epoch that lost (ALONE's second): then the retry loses again
    assert ran[3:] == [ALONE] * (wait - 1) + [FULL]
    grow = 4 if slow < 200.0 * (1 - Regimes.FAR_BEHIND) else 2
    assert reg.wait[FULL] == min(Regimes.MAX_WAIT, grow * wait)


@pytest.mark.parametrize("slow,wait,steps", [(100.0, 16, Regimes.EPOCH_STEPS // 2),
                                             (190.0, 8, Regimes.EPOCH_STEPS)])
def test_a_retry_of_a_regime_far_behind_runs_half_an_epoch(slow, wait, steps):
    """The retry of a regime over 15% behind the best is half an epoch (it is mostly a
    cost); one closer runs a whole epoch."""
    reg = Regimes((FULL, ALONE))
    run_epochs(reg, {FULL: slow, ALONE: 200.0}, 3 + wait - 1)
    assert reg.arm == FULL  # its retry is next
    done, now, n = sum(reg.epochs.values()), 1e3, 0
    while sum(reg.epochs.values()) == done:
        now += 1.0 / slow
        reg.note_step(1, now)
        n += 1
    assert n == Regimes.SETTLE_STEPS + steps


def test_every_regime_the_first_tries_did_not_pick_waits_as_a_loser():
    """Three regimes: the first tries compare the last one with the first only; the middle
    one, slower than the best by far, still waits 4x the first wait."""
    reg = Regimes((FULL, LEAN, ALONE))
    ran = run_epochs(reg, {FULL: 150.0, LEAN: 100.0, ALONE: 200.0}, 4)
    assert ran == [FULL, LEAN, ALONE, ALONE]  # the last: ALONE confirms its lead
    assert reg.best == ALONE and reg.wait[LEAN] == 4 * Regimes.FIRST_WAIT
    assert reg.wait[FULL] == 4 * Regimes.FIRST_WAIT  # displaced, 25% slower


def test_one_lucky_epoch_does_not_take_over():
    """A regime far behind whose retry is lucky (10x faster) runs once more; back to its
    usual rate it stays a loser, and waits 4x longer."""
    reg = Regimes((FULL, ALONE))
    run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 3)
    assert reg.best == ALONE and reg.wait[FULL] == 16
    ran = run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 15)
    assert reg.arm == FULL and ran[-1] == ALONE  # its retry is next
    assert run_epochs(reg, {FULL: 2000.0, ALONE: 200.0}, 1) == [FULL]  # lucky
    assert reg.arm == FULL and reg.best == ALONE  # ahead: once more
    run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 1)
    assert reg.best == ALONE and reg.arm == ALONE and reg.wait[FULL] == 64


def test_a_regime_lucky_twice_takes_over_and_its_waits_are_not_reset():
    """Two lucky epochs in a row take over; when the lead is lost again, the regime waits
    longer than before its luck (waits are never reset)."""
    reg = Regimes((FULL, ALONE))
    run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 18)
    assert reg.arm == FULL and reg.wait[FULL] == 16
    ran = run_epochs(reg, {FULL: 2000.0, ALONE: 200.0}, 2)
    assert ran == [FULL, FULL] and reg.best == FULL
    ran = run_epochs(reg, {FULL: 100.0, ALONE: 200.0}, 4)
    assert reg.best == ALONE and reg.wait[FULL] == min(Regimes.MAX_WAIT, 4 * 16)


def test_a_partial_epoch_of_half_the_steps_counts_at_the_next_generation():
    """A generation that ends within an epoch: with at least half an epoch's timed steps the
    epoch counts, timed to its last step (an exploration cut short is not rerun from its
    start); with fewer it is dropped."""
    half = Regimes.EPOCH_STEPS // 2
    for timed, counted in ((half, True), (half - 1, False)):
        reg = Regimes((FULL, ALONE))
        reg.begin(0.0)
        for i in range(Regimes.SETTLE_STEPS + timed):
            reg.note_step(2, 0.01 * (i + 1))
        reg.begin(5.0)  # the next generation, long after
        assert (reg.epochs == {FULL: 1}) is counted
        if counted:  # 2 tokens per 0.01 s, the idle gap to the next generation not counted
            assert reg.rate(FULL) == pytest.approx(200.0) and reg.arm == ALONE
        else:
            assert reg.rate(FULL) is None and reg.arm == FULL


def test_pipespec_generate_batches_tokens_and_still_stops_at_eos_and_the_limit():
    """generate() receives PipeSpec's tokens in batches of 16: an eos long before
    max_new_tokens still ends the output there, and a limit that is no multiple of 16 is
    exact."""
    stages = _hierarchy()
    ref = FastPipeline(stages[-1:]).generate(PROMPT, 60, ignore_eos=True).token_ids
    eos = ref[20]
    first = ref.index(eos)
    pipe = FastPipeline(stages, eos_token_ids=[eos])
    res = pipe.generate(PROMPT, 200)
    assert res.token_ids == ref[: first + 1] and res.finish_reason == "eos"
    assert pipe.generate(PROMPT, 37, ignore_eos=True).token_ids == ref[:37]


def test_memory_keeps_the_eight_latest_settings_and_regimes_can_be_off():
    pipe = FastPipeline(_hierarchy(), mode="sync")
    for i in range(9):  # unseeded sampling: timed, a key per temperature
        pipe.generate(PROMPT, 8, temperature=0.1 * (i + 1), ignore_eos=True)
    temps = [key[3] for key in pipe._memory._saved]
    assert len(temps) == 8 and temps == pytest.approx([0.1 * (i + 1) for i in range(1, 9)])
    off = FastPipeline(_hierarchy(), mode="sync", regimes=False)
    assert "regimes" not in off.generate(PROMPT, 30, ignore_eos=True).stats
    assert not off._memory._saved
