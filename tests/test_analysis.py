"""Tests for the PipeSpec analytical model (pure Python, no torch)."""

from __future__ import annotations

import math
import random

import pytest

from pipespec_fast.analysis import (
    LatencyModel,
    Prediction,
    StageProfile,
    alpha_from_mean_accepted,
    alpha_needed,
    estimate_alpha,
    expected_accepted,
    expected_tokens_per_step,
    predict_from_stats,
    predict_pipeline,
    speculation_ceiling,
    sync_sd_speedup,
    verify_probability,
)

ALPHAS = [0.0, 1e-12, 0.05, 0.3, 0.5, 0.8, 0.95, 1 - 1e-9, 1.0]
GAMMAS = [1, 2, 4, 8, 16]


# ---------------------------------------------------------------------------------------------
# closed forms: hand-computed values
# ---------------------------------------------------------------------------------------------


def test_hand_values_alpha08_gamma4():
    # alpha^5 = 0.32768
    assert expected_accepted(0.8, 4) == pytest.approx((1 - 0.32768) / 0.2, rel=1e-12)
    assert expected_accepted(0.8, 4) == pytest.approx(3.3616, rel=1e-12)
    rho = verify_probability(0.8, 4)
    assert rho == pytest.approx(0.8 / (1 - 0.32768 + 0.8), rel=1e-12)
    assert rho == pytest.approx(0.8 / 1.47232, rel=1e-12)
    # E[N] = (1 - rho) + rho * 3.3616 = 1 + 2.3616 * rho
    en = expected_tokens_per_step(0.8, 4)
    assert en == pytest.approx(1 + 2.3616 * 0.8 / 1.47232, rel=1e-12)
    assert en == pytest.approx(2.283199304499, rel=1e-10)
    # sync SD, c = 0.1: 3.3616 / (4 * 0.1 + 1)
    assert sync_sd_speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4, rel=1e-12)


def test_hand_values_alpha05_gamma1():
    # A = 1 + 0.5 = 1.5; rho = 0.5 / (1 - 0.25 + 0.5) = 0.4; E[N] = 0.6 + 0.4 * 1.5 = 1.2
    assert expected_accepted(0.5, 1) == pytest.approx(1.5)
    assert verify_probability(0.5, 1) == pytest.approx(0.4)
    assert expected_tokens_per_step(0.5, 1) == pytest.approx(1.2)
    assert sync_sd_speedup(0.5, 1, 0.0) == pytest.approx(1.5)


def test_geometric_sum_identity():
    for a in ALPHAS:
        for g in GAMMAS:
            direct = math.fsum(a**j for j in range(g + 1))
            assert expected_accepted(a, g) == pytest.approx(direct, rel=1e-12, abs=0)


# ---------------------------------------------------------------------------------------------
# limits and continuity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", GAMMAS)
def test_exact_endpoints(g):
    assert expected_accepted(0.0, g) == 1.0
    assert verify_probability(0.0, g) == 0.0
    assert expected_tokens_per_step(0.0, g) == 1.0
    assert expected_accepted(1.0, g) == g + 1
    assert verify_probability(1.0, g) == 1.0
    assert expected_tokens_per_step(1.0, g) == g + 1
    assert sync_sd_speedup(1.0, g, 0.0) == g + 1
    assert sync_sd_speedup(0.0, g, 0.0) == 1.0


@pytest.mark.parametrize("g", GAMMAS)
@pytest.mark.parametrize(
    "fn",
    [expected_accepted, verify_probability, expected_tokens_per_step],
    ids=lambda f: f.__name__,
)
def test_continuous_at_alpha_one_and_zero(fn, g):
    assert fn(1 - 1e-9, g) == pytest.approx(fn(1.0, g), rel=1e-6)
    assert fn(1 - 1e-15, g) == pytest.approx(fn(1.0, g), rel=1e-12)
    assert fn(1e-9, g) == pytest.approx(fn(0.0, g), abs=1e-8)
    assert fn(5e-324, g) == pytest.approx(fn(0.0, g), abs=1e-300)


@pytest.mark.parametrize("g", GAMMAS)
def test_sync_speedup_continuous(g):
    assert sync_sd_speedup(1 - 1e-9, g, 0.2) == pytest.approx(sync_sd_speedup(1.0, g, 0.2), 1e-6)
    assert sync_sd_speedup(1e-9, g, 0.2) == pytest.approx(sync_sd_speedup(0.0, g, 0.2), 1e-6)


@pytest.mark.parametrize("g", GAMMAS)
def test_tokens_per_step_above_one_and_monotone(g):
    prev = 1.0
    for j in range(1, 1000):
        a = j / 1000
        en = expected_tokens_per_step(a, g)
        assert en > 1.0
        assert en <= g + 1
        assert en > prev - 1e-15
        assert 0.0 < verify_probability(a, g) < 1.0
        prev = en


def test_fractional_gamma_interpolates():
    lo, mid, hi = (expected_accepted(0.7, g) for g in (3, 3.5, 4))
    assert lo < mid < hi


# ---------------------------------------------------------------------------------------------
# Monte-Carlo checks
# ---------------------------------------------------------------------------------------------


def _accepted_drafts(rng: random.Random, alpha: float, gamma: int) -> int:
    j = 0
    while j < gamma and rng.random() < alpha:
        j += 1
    return j


@pytest.mark.parametrize("alpha,gamma,c", [(0.8, 4, 0.1), (0.5, 2, 0.3), (0.95, 8, 0.05)])
def test_sync_sd_matches_simulation(alpha, gamma, c):
    rng = random.Random(1234)
    iters = 100_000
    tokens = 0
    for _ in range(iters):
        tokens += _accepted_drafts(rng, alpha, gamma) + 1  # accepted drafts + bonus/correction
    time_units = iters * (gamma * c + 1)  # target forward = 1 unit, AR = 1 token / unit
    simulated = tokens / time_units
    assert simulated == pytest.approx(sync_sd_speedup(alpha, gamma, c), rel=0.01)


@pytest.mark.parametrize("alpha,gamma", [(0.8, 4), (0.5, 1), (0.3, 6), (0.95, 3)])
def test_never_wait_chain_matches_simulation(alpha, gamma):
    """Token-level simulation of a never-wait verifier with an always-ready drafter.

    With valid drafts the verifier checks a window (accepted drafts + 1 tokens); the drafter's
    speculation beyond it stays valid iff the whole window passed and its token at the bonus
    position matches (prob alpha). Without valid drafts it decodes one token; the drafter's
    parallel speculation is valid iff its first token matches (prob alpha).
    """
    rng = random.Random(99)
    steps = 200_000
    tokens = 0
    verifies = 0
    have_drafts = False
    for _ in range(steps):
        if have_drafts:
            verifies += 1
            j = _accepted_drafts(rng, alpha, gamma)
            tokens += j + 1
            have_drafts = j == gamma and rng.random() < alpha
        else:
            tokens += 1
            have_drafts = rng.random() < alpha
    assert verifies / steps == pytest.approx(verify_probability(alpha, gamma), abs=0.005)
    assert tokens / steps == pytest.approx(expected_tokens_per_step(alpha, gamma), rel=0.01)


def test_rho_is_stationary_distribution():
    for a in (0.1, 0.5, 0.8, 0.99):
        for g in (1, 4, 8):
            p_gv, p_vg = a, 1 - a ** (g + 1)
            pi_v = 0.5
            for _ in range(10_000):
                pi_v = (1 - pi_v) * p_gv + pi_v * (1 - p_vg)
            assert verify_probability(a, g) == pytest.approx(pi_v, rel=1e-9)


@pytest.mark.parametrize("alpha,gamma", [(0.8, 4), (0.4, 3), (0.97, 6)])
def test_estimate_alpha_recovers_truth(alpha, gamma):
    rng = random.Random(7)
    counts = [_accepted_drafts(rng, alpha, gamma) for _ in range(50_000)]
    assert estimate_alpha(counts, gamma) == pytest.approx(alpha, abs=0.01)
    # the naive accepted/proposed ratio is biased low, the MLE is not
    naive = sum(counts) / (gamma * len(counts))
    assert naive < alpha - 0.01


def test_estimate_alpha_edges():
    assert estimate_alpha([4, 4, 4], 4) == 1.0
    assert estimate_alpha([0, 0], 4) == 0.0
    assert estimate_alpha([2, 4], 4) == pytest.approx(6 / 7)


def test_alpha_from_mean_accepted_inverts():
    for a in (0.0, 0.2, 0.5, 0.8, 0.99, 1.0):
        for g in (1, 4, 8):
            m = expected_accepted(a, g) - 1
            assert alpha_from_mean_accepted(m, g) == pytest.approx(a, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0000001, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "fn",
    [expected_accepted, verify_probability, expected_tokens_per_step],
    ids=lambda f: f.__name__,
)
def test_bad_alpha(fn, bad):
    with pytest.raises(ValueError, match="alpha"):
        fn(bad, 4)


@pytest.mark.parametrize("bad", [0, 0.5, -3])
def test_bad_gamma(bad):
    for fn in (expected_accepted, verify_probability, expected_tokens_per_step):
        with pytest.raises(ValueError, match="gamma"):
            fn(0.5, bad)
    with pytest.raises(ValueError, match="gamma"):
        sync_sd_speedup(0.5, bad, 0.1)


def test_bad_c_and_types():
    with pytest.raises(ValueError, match="c must"):
        sync_sd_speedup(0.5, 4, -0.1)
    with pytest.raises(TypeError, match="alpha"):
        expected_accepted("0.5", 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="alpha"):
        expected_accepted(True, 4)  # type: ignore[arg-type]


def test_bad_latency():
    with pytest.raises(ValueError, match=r"seconds\[1\]"):
        LatencyModel.fit([1, 2], [0.01, -0.02])
    with pytest.raises(ValueError, match=r"seconds\[0\]"):
        LatencyModel.table([1], [0.0])
    with pytest.raises(ValueError, match="seconds"):
        LatencyModel.constant(-1.0)
    with pytest.raises(ValueError, match=r"ns\[0\]"):
        LatencyModel.fit([0, 2], [0.01, 0.02])
    with pytest.raises(ValueError, match="same length"):
        LatencyModel.fit([1, 2], [0.01])
    with pytest.raises(ValueError, match="a must"):
        LatencyModel.linear(-0.01, 0.001)
    with pytest.raises(ValueError, match="b must"):
        LatencyModel.linear(0.01, -0.001)
    with pytest.raises(ValueError, match="n_tokens"):
        LatencyModel.constant(0.01).latency_s(0)


def test_bad_stage_profile():
    lat = LatencyModel.constant(0.01)
    with pytest.raises(ValueError, match="alpha"):
        StageProfile("t", lat, alpha=1.5, gamma=4)
    with pytest.raises(ValueError, match="gamma"):
        StageProfile("t", lat, alpha=0.5, gamma=0)
    with pytest.raises(ValueError, match="gamma"):
        StageProfile("t", lat, alpha=0.5, gamma=2.5)  # type: ignore[arg-type]


def test_bad_pipeline():
    d = StageProfile("d", LatencyModel.constant(0.001))
    t = StageProfile("t", LatencyModel.constant(0.01), alpha=0.5, gamma=4)
    with pytest.raises(ValueError, match="stages"):
        predict_pipeline([t])
    with pytest.raises(ValueError, match="alpha"):
        predict_pipeline([d, StageProfile("t", LatencyModel.constant(0.01))])
    with pytest.raises(ValueError, match="policy"):
        predict_pipeline([d, t], policy="bogus")
    with pytest.raises(ValueError, match="step_model"):
        predict_pipeline([d, t], step_model="bogus")
    with pytest.raises(ValueError, match="on_starve"):
        predict_pipeline([d, t], on_starve="bogus")


# ---------------------------------------------------------------------------------------------
# latency models
# ---------------------------------------------------------------------------------------------


def test_fit_recovers_a_b():
    ns = [1, 2, 4, 8, 16]
    exact = LatencyModel.fit(ns, [0.02 + 0.003 * n for n in ns])
    assert exact.a == pytest.approx(0.02, rel=1e-12)
    assert exact.b == pytest.approx(0.003, rel=1e-12)
    rng = random.Random(0)
    ns = [rng.choice([1, 2, 3, 5, 9, 17]) for _ in range(2000)]
    noisy = LatencyModel.fit(ns, [0.02 + 0.003 * n + rng.gauss(0, 1e-4) for n in ns])
    assert noisy.a == pytest.approx(0.02, abs=2e-5)
    assert noisy.b == pytest.approx(0.003, abs=5e-6)
    assert noisy.latency_s(5) == pytest.approx(0.035, rel=1e-3)


def test_fit_constraints():
    flat = LatencyModel.fit([4, 4, 4], [0.01, 0.02, 0.03])
    assert (flat.a, flat.b) == (pytest.approx(0.02), 0.0)
    decreasing = LatencyModel.fit([1, 2, 3], [0.03, 0.02, 0.01])
    assert decreasing.b == 0.0 and decreasing.a == pytest.approx(0.02)
    through_origin = LatencyModel.fit([1, 2, 3], [0.001, 0.005, 0.009])  # LS intercept < 0
    assert through_origin.a == 0.0 and through_origin.b > 0.0
    assert through_origin.latency_s(1) > 0.0


def test_table_interpolation():
    t = LatencyModel.table([1, 5, 3, 3], [0.010, 0.020, 0.014, 0.016])
    assert t.latency_s(1) == pytest.approx(0.010)
    assert t.latency_s(2) == pytest.approx(0.0125)
    assert t.latency_s(3) == pytest.approx(0.015)
    assert t.latency_s(4) == pytest.approx(0.0175)
    assert t.latency_s(7) == pytest.approx(0.025)  # last slope 0.0025/token
    t2 = LatencyModel.table([2, 4], [0.01, 0.02])
    assert t2.latency_s(1) == pytest.approx(0.01)  # flat below the first point
    assert LatencyModel.table([4], [0.01]).latency_s(9) == pytest.approx(0.01)


def test_latency_dict_roundtrip():
    for m in (LatencyModel.linear(0.01, 0.002), LatencyModel.table([1, 4], [0.01, 0.02])):
        m2 = LatencyModel.from_dict(m.to_dict())
        for n in (1, 2, 3, 4, 9):
            assert m2.latency_s(n) == pytest.approx(m.latency_s(n))
    assert LatencyModel.from_dict(0.5).latency_s(3) == 0.5


# ---------------------------------------------------------------------------------------------
# pipeline prediction
# ---------------------------------------------------------------------------------------------


def _two_stage(alpha=0.8, gamma=4, l_draft=0.001, target=None):
    target = target or LatencyModel.constant(0.05)
    return [
        StageProfile("draft", LatencyModel.constant(l_draft)),
        StageProfile("target", target, alpha=alpha, gamma=gamma),
    ]


def test_flat_latency_fast_drafter_is_paper_rate():
    p = predict_pipeline(_two_stage())
    assert isinstance(p, Prediction)
    en = expected_tokens_per_step(0.8, 4)
    assert p.ar_tokens_per_s == pytest.approx(20.0)
    assert p.pipespec_tokens_per_s == pytest.approx(en / 0.05)
    assert p.pipespec_speedup == pytest.approx(en)
    assert not p.stages[-1].starved
    assert p.bottleneck == "target"
    # sync SD with c = 0.001 / 0.05 and a flat target forward is the closed form
    assert p.sync_sd_speedup == pytest.approx(sync_sd_speedup(0.8, 4, 0.02))
    assert p.alpha_end_to_end == pytest.approx(0.8)


@pytest.mark.parametrize("alpha", [1e-6, 0.1, 0.5, 0.9, 1.0])
def test_pipespec_beats_ar_when_draft_is_cheap(alpha):
    # memory-bound target (verifying 5 positions costs one forward), cheap drafter
    p = predict_pipeline(_two_stage(alpha=alpha, l_draft=0.001))
    assert p.pipespec_tokens_per_s > p.ar_tokens_per_s
    wait = predict_pipeline(_two_stage(alpha=alpha, l_draft=0.001), policy="wait")
    if alpha >= 0.1:  # waiting for a refill only pays once alpha is non-trivial
        assert wait.pipespec_tokens_per_s > wait.ar_tokens_per_s


@pytest.mark.parametrize("alpha", [1e-6, 0.01, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_beats_ar_iff_accepted_covers_verify_cost(alpha):
    # when the window costs more than one token, the paper policy beats AR iff A >= L(5)/L(1)
    target = LatencyModel.linear(0.05, 0.001)
    p = predict_pipeline(_two_stage(alpha=alpha, target=target))
    covers = expected_accepted(alpha, 4) >= target.latency_s(5) / target.latency_s(1)
    assert (p.pipespec_tokens_per_s >= p.ar_tokens_per_s) == covers


def test_alpha_zero_paper_equals_ar():
    p = predict_pipeline(_two_stage(alpha=0.0))
    assert p.pipespec_tokens_per_s == pytest.approx(p.ar_tokens_per_s)


def test_alpha_one_paper_full_windows():
    p = predict_pipeline(_two_stage(alpha=1.0, gamma=4))
    assert p.pipespec_tokens_per_s == pytest.approx(5 / 0.05)


def test_starved_target_hand_computed():
    # drafter 20 ms/token -> 50 drafts/s; target flat 50 ms; alpha 0.8, gamma 4
    p = predict_pipeline(_two_stage(l_draft=0.02))
    t = p.stages[-1]
    rho = 0.8 / 1.47232
    a_big = 3.3616
    p_break = 1 - 0.32768
    v_cap = rho / 0.05
    v_sup = 50 / (4 + p_break * 50 * 0.05)
    assert v_sup < v_cap
    assert t.starved and p.bottleneck == "draft"
    assert t.verify_steps_per_s == pytest.approx(v_sup)
    fill = v_sup * a_big + (1 - v_sup * 0.05) / 0.05
    assert p.pipespec_tokens_per_s == pytest.approx(fill)
    idle = predict_pipeline(_two_stage(l_draft=0.02), on_starve="idle")
    assert idle.pipespec_tokens_per_s == pytest.approx((1 + 2.3616 * rho) / 0.05 * v_sup / v_cap)
    assert idle.pipespec_tokens_per_s < p.pipespec_tokens_per_s
    assert any("starved" in n for n in p.notes)


def test_wait_policy_hand_computed():
    # drafter 2 ms, target 30 ms + 1 ms/token, alpha 0.7, gamma 4
    target = LatencyModel.linear(0.03, 0.001)
    p = predict_pipeline(_two_stage(alpha=0.7, l_draft=0.002, target=target), policy="wait")
    a_big = (1 - 0.7**5) / 0.3
    p_break = 1 - 0.7**5
    t_cycle = 0.035 + p_break * 4 * 0.002
    assert p.pipespec_tokens_per_s == pytest.approx(a_big / t_cycle)
    # with a plain drafter below, waiting is never worse than synchronous SD
    assert p.pipespec_tokens_per_s >= p.sync_sd_tokens_per_s
    assert p.sync_sd_tokens_per_s == pytest.approx(a_big / (4 * 0.002 + 0.035))


def test_a_tree_verifier_is_priced_at_its_nodes_and_credited_its_measured_length():
    """A tree of 9 nodes (window depth 4) that commits 3.2 tokens per verification: the wait
    policy's cycle is L(10), not L(5), and its tokens 3.2, not A(0.7, 4)."""
    target = LatencyModel.linear(0.03, 0.001)
    tree = [StageProfile("draft", LatencyModel.constant(0.002)),
            StageProfile("target", target, alpha=0.7, gamma=4, accepted_per_verify=3.2,
                         verify_tokens=10)]
    p = predict_pipeline(tree, policy="wait")
    p_break = 1 - 0.7**5
    t_cycle = 0.04 + p_break * 4 * 0.002
    assert p.pipespec_tokens_per_s == pytest.approx(3.2 / t_cycle)
    assert p.stages[-1].expected_accepted == 3.2
    assert p.sync_sd_tokens_per_s == pytest.approx(3.2 / (4 * 0.002 + 0.04))
    d = tree[-1].to_dict()
    assert d["accepted_per_verify"] == 3.2 and d["verify_tokens"] == 10
    assert StageProfile.from_dict(d) == tree[-1]
    assert "accepted_per_verify" not in _two_stage()[-1].to_dict()  # a chain's stays as before
    with pytest.raises(ValueError, match="verify_tokens"):
        StageProfile("t", target, alpha=0.7, verify_tokens=0.5)


def test_a_measured_verify_share_replaces_the_chains_and_is_not_supply_limited():
    """A verifier that verified drafts at 90% of its steps: ``rho = 0.9``, not the chain's
    ``verify_probability``; its rate is ``E[N] / T`` at that share even where the chain's
    supply limit would starve it (the measured share already counts such steps)."""
    target = LatencyModel.linear(0.03, 0.001)
    for l_draft in (0.001, 0.05):  # a fast drafter, and one the chain would call starving
        st = _two_stage(alpha=0.6, gamma=3, l_draft=l_draft, target=target)
        st[-1] = StageProfile("target", target, alpha=0.6, gamma=3, verify_share=0.9)
        p = predict_pipeline(st)
        en = 0.1 + 0.9 * expected_accepted(0.6, 3)
        t = 0.1 * 0.031 + 0.9 * 0.034
        assert p.stages[-1].rho == 0.9 and p.pipespec_tokens_per_s == pytest.approx(en / t)
        assert not p.stages[-1].starved and p.bottleneck == "target" and not p.notes
        chain = predict_pipeline(_two_stage(alpha=0.6, gamma=3, l_draft=l_draft, target=target))
        assert chain.stages[-1].rho == pytest.approx(verify_probability(0.6, 3))
    d = st[-1].to_dict()
    assert d["verify_share"] == 0.9 and StageProfile.from_dict(d) == st[-1]
    assert "verify_share" not in _two_stage()[-1].to_dict()
    with pytest.raises(ValueError, match="verify_share"):
        StageProfile("t", target, alpha=0.7, verify_share=1.5)
    with pytest.raises(ValueError, match=r"\['verify_share'\]"):
        StageProfile.from_dict({"latency": 0.01, "alpha": 0.5, "verify_share": -0.1})


def test_a_step_overhead_is_added_to_every_step_of_the_stage():
    """The target's host time per step (bookkeeping, messages) lengthens its one-token and
    its verify steps alike: the wait policy's cycle, AR and sync SD all pay it."""
    target = LatencyModel.linear(0.03, 0.001)
    plain = _two_stage(alpha=0.7, l_draft=0.002, target=target)
    slow = [plain[0], StageProfile("target", target, alpha=0.7, gamma=4, step_overhead_s=0.004)]
    p = predict_pipeline(slow, policy="wait")
    a_big, p_break = (1 - 0.7**5) / 0.3, 1 - 0.7**5
    assert p.pipespec_tokens_per_s == pytest.approx(a_big / (0.039 + p_break * 4 * 0.002))
    assert p.ar_tokens_per_s == pytest.approx(1 / 0.035)
    assert p.sync_sd_tokens_per_s == pytest.approx(a_big / (4 * 0.002 + 0.039))
    assert StageProfile.from_dict(slow[1].to_dict()) == slow[1]
    assert "step_overhead_s" not in plain[1].to_dict()
    with pytest.raises(ValueError, match="step_overhead_s must be >= 0"):
        StageProfile("t", target, step_overhead_s=-0.001)


def test_regime_prediction_weighs_each_regime_by_its_tokens():
    from pipespec_fast.analysis_regimes import predict_regimes

    full = {"stages": [{"name": "d", "latency": 0.002},
                       {"name": "t", "alpha": 0.7, "gamma": 4, "latency": {"a": 0.03, "b": 0.001}}]}
    alone = {"stages": [{"name": "t", "latency": {"a": 0.03, "b": 0.001}}]}
    pred = predict_regimes({"full": (full, 60), "alone": (alone, 40), "lean": (full, 0)})
    r_full = predict_from_stats(full).pipespec_tokens_per_s
    assert pred.rates == {"full": r_full, "alone": pytest.approx(1 / 0.031),
                          "lean": r_full}
    assert pred.tokens_per_s == pytest.approx(100 / (60 / r_full + 40 * 0.031))
    assert set(pred.pipelines) == {"full", "lean"}
    assert pred.end_to_end_tokens_per_s(100, 0.5) == pytest.approx(
        100 / (0.5 + 100 / pred.tokens_per_s))
    with pytest.raises(ValueError, match="no regime ran"):
        predict_regimes({})
    with pytest.raises(ValueError, match="no regime committed"):
        predict_regimes({"alone": (alone, 0)})
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        predict_regimes({"alone": (alone, -1)})


def test_verify_step_model_is_slower_with_growing_latency():
    target = LatencyModel.linear(0.03, 0.002)
    mixed = predict_pipeline(_two_stage(target=target))
    verify = predict_pipeline(_two_stage(target=target), step_model="verify")
    assert verify.pipespec_tokens_per_s < mixed.pipespec_tokens_per_s
    en = expected_tokens_per_step(0.8, 4)
    assert verify.pipespec_tokens_per_s == pytest.approx(en / target.latency_s(5))


def test_compute_bound_target_can_lose_to_ar():
    # verifying 5 tokens costs 5x one token: A < L(5)/L(1), so the model predicts a slowdown
    target = LatencyModel.linear(0.0, 0.01)
    p = predict_pipeline(_two_stage(alpha=0.5, target=target))
    assert p.pipespec_tokens_per_s < p.ar_tokens_per_s
    assert any("slower than AR" in n for n in p.notes)


def test_three_stage_hierarchy():
    stages = [
        StageProfile("tiny", LatencyModel.constant(0.001)),
        StageProfile("mid", LatencyModel.linear(0.008, 0.0005), alpha=0.7, gamma=4),
        StageProfile("big", LatencyModel.linear(0.05, 0.001), alpha=0.8, gamma=4),
    ]
    p = predict_pipeline(stages)
    assert len(p.stages) == 3
    assert p.alpha_end_to_end == pytest.approx(0.56)
    mid, big = p.stages[1], p.stages[2]
    assert big.draft_supply_per_s == pytest.approx(mid.tokens_per_s)
    assert not big.starved
    assert p.pipespec_tokens_per_s == pytest.approx(big.capacity_tokens_per_s)
    assert p.pipespec_tokens_per_s >= p.ar_tokens_per_s
    # sync SD baseline uses the stage right below the target as its drafter
    sync = expected_accepted(0.8, 4) / (4 * stages[1].latency_s(1) + stages[2].latency_s(5))
    assert p.sync_sd_tokens_per_s == pytest.approx(sync)
    # a slow middle stage starves the target and becomes the bottleneck
    stages[1] = StageProfile("mid", LatencyModel.constant(0.08), alpha=0.7, gamma=4)
    slow = predict_pipeline(stages)
    assert slow.stages[-1].starved and slow.bottleneck == "mid"
    assert slow.pipespec_tokens_per_s < p.pipespec_tokens_per_s


def test_predict_from_stats_matches_profiles():
    stats = {
        "stages": [
            {"name": "draft", "latency": {"n": [1, 2, 4], "s": [0.002, 0.0021, 0.0023]}},
            {
                "name": "target",
                "alpha": 0.75,
                "gamma": 5,
                "latency": {"n": [1, 6, 6], "s": [0.04, 0.046, 0.047], "kind": "table"},
            },
        ],
        "measured_tokens_per_s": 123.0,  # ignored
    }
    p = predict_from_stats(stats)
    direct = predict_pipeline(
        [
            StageProfile("draft", LatencyModel.fit([1, 2, 4], [0.002, 0.0021, 0.0023])),
            StageProfile(
                "target",
                LatencyModel.table([1, 6, 6], [0.04, 0.046, 0.047]),
                alpha=0.75,
                gamma=5,
            ),
        ]
    )
    assert p == direct
    assert p.stages[-1].name == "target"
    assert predict_from_stats({**stats, "policy": "wait"}).policy == "wait"
    assert predict_from_stats(stats, step_model="verify").step_model == "verify"
    d = p.to_dict()
    assert d["stages"][1]["alpha"] == 0.75 and d["pipespec_tokens_per_s"] > 0
    assert "PipeSpec" in p.summary()


def test_predict_from_stats_errors_name_the_field():
    good = {"name": "t", "alpha": 0.5, "gamma": 4, "latency": 0.01}
    with pytest.raises(ValueError, match=r"stats\['stages'\]\[1\]\['alpha'\]"):
        predict_from_stats({"stages": [{"latency": 0.001}, {**good, "alpha": 2.0}]})
    with pytest.raises(ValueError, match=r"stats\['stages'\]\[1\]\['alpha'\]"):
        predict_from_stats({"stages": [{"latency": 0.001}, {"latency": 0.01}]})
    with pytest.raises(ValueError, match=r"stats\['stages'\]\[1\]\['gamma'\]"):
        predict_from_stats({"stages": [{"latency": 0.001}, {**good, "gamma": 0}]})
    with pytest.raises(ValueError, match=r"stats\['stages'\]\[0\]\['latency'\].*seconds\[0\]"):
        predict_from_stats({"stages": [{"latency": {"n": [1], "s": [-1.0]}}, good]})
    with pytest.raises(ValueError, match="stages"):
        predict_from_stats({})
    p = predict_from_stats({"stages": [{"latency": 0.001}, good]})
    assert [s.name for s in p.stages] == ["stage0", "t"]


# ---------------------------------------------------------------------------------------------
# speculation ceiling
# ---------------------------------------------------------------------------------------------


def test_ceiling_compute_bound_target_hand_computed():
    # L(n) = 3.3 + 1.3 n ms (a verify bound by arithmetic), alpha 0.45, a 0.5 ms draft step
    c = speculation_ceiling(LatencyModel.linear(3.3e-3, 1.3e-3), 0.45, 0.5e-3, max_gamma=6)
    assert c.ar_tokens_per_s == pytest.approx(1 / 4.6e-3)
    # g = 1: 1.45 tokens per 5.9 ms verify (+ 0.5 ms drafting for sync); g = 2 is worse:
    # 1.6525 / 7.2 ms and 1.6525 / 8.2 ms
    assert (c.free_draft_gamma, c.sync_gamma) == (1, 1)
    assert c.free_draft_tokens_per_s == pytest.approx(1.45 / 5.9e-3)
    assert c.sync_tokens_per_s == pytest.approx(1.45 / 6.4e-3)
    assert c.free_draft_vs_sync == pytest.approx(6.4 / 5.9)
    assert c.free_draft_vs_ar == pytest.approx(1.45 * 4.6 / 5.9)
    d = c.to_dict()
    assert d["free_draft_vs_sync"] == pytest.approx(6.4 / 5.9) and d["sync_gamma"] == 1


def test_ceiling_memory_bound_target_uses_the_whole_window():
    # a verify that costs what a decode step costs: every extra draft is worth verifying
    c = speculation_ceiling(LatencyModel.constant(5e-3), 0.8, 0.0, max_gamma=6)
    assert c.free_draft_gamma == c.sync_gamma == 6
    assert c.free_draft_tokens_per_s == pytest.approx((1 - 0.8**7) / 0.2 / 5e-3)
    assert c.sync_tokens_per_s == pytest.approx(c.free_draft_tokens_per_s)


def test_ceiling_useless_drafts_mean_decoding_alone():
    c = speculation_ceiling(LatencyModel.linear(3e-3, 1e-3), 0.0, 1e-3)
    assert (c.sync_gamma, c.free_draft_gamma) == (0, 0)
    assert c.sync_tokens_per_s == c.free_draft_tokens_per_s == pytest.approx(1 / 4e-3)
    assert c.free_draft_vs_sync == 1.0


def test_ceiling_per_step_draft_costs_sum_the_first_g_steps():
    # L(n) = 3 + 0.25 n ms; the first draft step after a verify costs 1.1 ms (the draft's
    # weights read back from memory), the next ones 0.5 and 0.4 ms (the last repeats)
    line = LatencyModel.linear(3e-3, 0.25e-3)
    steps = [1.1e-3, 0.5e-3, 0.4e-3]
    c = speculation_ceiling(line, 0.6, steps, max_gamma=5)
    rates = {g: expected_accepted(0.6, g) / (3e-3 + 0.25e-3 * (g + 1) + d)
             for g, d in ((1, 1.1e-3), (2, 1.6e-3), (3, 2.0e-3), (4, 2.4e-3), (5, 2.8e-3))}
    best = max(rates, key=rates.get)
    assert rates[best] > 1 / 3.25e-3  # speculation pays at this alpha: the bound is a window
    assert c.sync_gamma == best and c.sync_tokens_per_s == pytest.approx(rates[best])
    # a one-entry sequence is the scalar cost; a dearer first step lowers the bound
    one = speculation_ceiling(line, 0.6, [0.4e-3], max_gamma=5)
    assert one == speculation_ceiling(line, 0.6, 0.4e-3, max_gamma=5)
    assert c.sync_tokens_per_s < one.sync_tokens_per_s
    assert c.free_draft_tokens_per_s == one.free_draft_tokens_per_s  # drafting not counted


def test_alpha_needed_is_where_the_bound_reaches_the_speedup():
    line = LatencyModel.linear(3e-3, 0.25e-3)
    for speedup, draft in ((1.2, 0.0), (1.6, 0.0), (1.2, 0.4e-3), (1.3, [1.1e-3, 0.4e-3])):
        a = alpha_needed(line, speedup, draft, max_gamma=8)
        assert a is not None and 0.0 < a < 1.0
        def ratio(x, draft=draft):
            return speculation_ceiling(line, x, draft, 8).sync_tokens_per_s * 3.25e-3

        assert ratio(a) >= speedup > ratio(a - 1e-4)
    # dearer drafts need more acceptance; free drafts bound every pipeline
    assert alpha_needed(line, 1.3, 0.0) < alpha_needed(line, 1.3, 0.5e-3)
    assert alpha_needed(line, 1.0) == 0.0  # AR itself
    # a verify of 9 tokens costs 5.5 ms: at most 9 tokens per 5.5 ms, 5.3x a 3.25 ms step
    assert alpha_needed(line, 5.0, 0.0, max_gamma=8) is not None
    assert alpha_needed(line, 5.6, 0.0, max_gamma=8) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"speedup": 0.0}, "speedup"), ({"speedup": float("nan")}, "speedup"),
    ({"draft_s": []}, "draft_s"), ({"draft_s": [1e-3, -1e-3]}, "draft_s"),
    ({"max_gamma": 0}, "max_gamma"),
])
def test_alpha_needed_rejects_bad_arguments(kwargs, match):
    args = {"target": LatencyModel.constant(1e-3), "speedup": 1.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        alpha_needed(**args)


@pytest.mark.parametrize("kwargs, match", [
    ({"draft_s": -1e-3}, "draft_s"), ({"max_gamma": 0}, "max_gamma"),
    ({"max_gamma": 2.5}, "max_gamma"), ({"alpha": 1.5}, "alpha"),
])
def test_ceiling_rejects_bad_arguments(kwargs, match):
    args = {"target": LatencyModel.constant(1e-3), "alpha": 0.5, "draft_s": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        speculation_ceiling(**args)
