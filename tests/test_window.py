"""The adaptive, cost-aware verification window (``Sequencer.window``: ``WindowPolicy``) and the
pipelines' use of a window of 0 (speculation switched off while it does not pay)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from tiny import family

from pipespec_fast import FastPipeline
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.window import WindowPolicy
from pipespec_fast.stages import LlamaStage

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def sequencer(acc: float, rej: float, lat: dict[int, float]) -> Sequencer:
    (m,) = family(1, seed=0)
    s = Sequencer(LlamaStage(m, max_len=64), SamplingParams(), index=1)
    s.policy.set_state(acc, rej, {n: (t, 1.0) for n, t in lat.items()})
    return s


def test_window_before_timings_uses_the_acceptance_rule() -> None:
    s = sequencer(acc=8.0, rej=2.0, lat={})  # a = 0.75: 0.75^7 <= 0.15
    assert s.window(16) == 7
    assert s.window(3) == 3


def test_window_grows_when_extra_rows_are_cheap() -> None:
    s = sequencer(acc=18.0, rej=2.0, lat={2: 0.0101, 5: 0.0104})  # a = 0.86, ~free rows
    assert s.window(12) == 12


def test_window_stays_short_when_every_row_costs() -> None:
    # L(n) = 4 ms + 1.2 ms n, a = 0.5: tokens per ms g=0 0.192, g=1 0.234, g=2 0.230,
    # g=3 0.213
    s = sequencer(acc=9.0, rej=9.0, lat={2: 0.0064, 4: 0.0088})
    assert s.window(8) == 1
    s = sequencer(acc=18.0, rej=6.0, lat={2: 0.0064, 4: 0.0088})  # a = 0.73: g=3 0.302
    assert s.window(8) == 3
    # drafting is not free in synchronous decoding: a cost per draft shortens the window
    assert s.window(8, draft_cost_s=0.002) == 1


def test_window_zero_when_speculation_does_not_pay_then_explores() -> None:
    # L(n) = 4 ms + 1.5 ms n, a = 0.2: one token alone (5.5 ms) beats any window
    s = sequencer(acc=1.0, rej=8.0, lat={2: 0.007, 4: 0.010})
    k = WindowPolicy.EXPLORE_EVERY
    got = [s.window(6) for _ in range(k + 2 * k + 4 * k)]
    # one draft after k steps alone, then after 2k, 4k while it keeps not paying
    assert got == [0] * (k - 1) + [1] + [0] * (2 * k - 1) + [1] + [0] * (4 * k - 1) + [1]
    # once speculation pays again, the exploration interval starts over
    s.policy.set_state(8.0, 2.0, {2: (0.0052, 1.0), 4: (0.0054, 1.0)})
    assert s.window(6) > 0
    s.policy.set_state(1.0, 8.0, {2: (0.007, 1.0), 4: (0.010, 1.0)})
    assert [s.window(6) for _ in range(k)] == [0] * (k - 1) + [1]


def test_window_times_a_step_alone_when_only_one_verify_size_is_known() -> None:
    # a verifier that has only ever verified 2 rows has no line: one step alone gives L(1)
    s = sequencer(acc=1.0, rej=8.0, lat={2: 0.007})
    assert s.window(6) == 0
    s.policy.note_latency(1, 0.0055)
    assert s.window(6) == 0  # the line through L(1) and L(2): speculation does not pay


def test_non_adaptive_window_is_the_maximum() -> None:
    s = sequencer(acc=1.0, rej=8.0, lat={2: 0.007, 4: 0.010})
    s.policy.adaptive = False
    assert s.window(5) == 5


def test_latency_line_fades_sizes_not_seen_for_a_while() -> None:
    s = sequencer(acc=0.0, rej=0.0, lat={})
    s.policy.note_latency(9, 0.5)  # one slow outlier
    for _ in range(80):
        s.policy.note_latency(2, 0.006)
        s.policy.note_latency(3, 0.007)
    assert set(s.policy.latency) == {2, 3}
    line = s.policy.line()
    c0, c1 = line
    assert c0 == pytest.approx(0.004) and c1 == pytest.approx(0.001)


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
@pytest.mark.parametrize("k", [2, 3])
def test_window_zero_steps_keep_greedy_output_identical(monkeypatch, mode, k) -> None:
    """Steps where a stage decodes alone, mixed with verification steps, at every level."""
    models = family(k, noise=0.05, seed=4)
    stages = [LlamaStage(m, name=f"s{i}", max_len=256) for i, m in enumerate(models)]
    ref = FastPipeline(stages[-1:]).generate(PROMPT, 40, ignore_eos=True).token_ids
    patterns: dict[int, itertools.cycle] = {}

    def window(self, max_n, draft_cost_s=0.0):  # per stage: alone, verify, alone, ...
        pattern = patterns.setdefault(self.index, itertools.cycle([0, 2, 0, 3, 1, 0, 3]))
        return min(max_n, next(pattern))

    monkeypatch.setattr(Sequencer, "window", window)
    pipe = FastPipeline(stages, regimes=False)  # the windows' pattern alone decides
    res = pipe.generate(PROMPT, 40, ignore_eos=True, mode=mode)
    assert res.token_ids == ref
    # both kinds of step happened (which stage verified what depends on thread timing)
    assert res.stage_stats[-1].verify_steps > 0
    assert sum(st.proposed for st in res.stage_stats[1:]) > 0


def test_seeded_sampling_windows_ignore_timings() -> None:
    """Seeded sampling must reproduce its draws: the window then follows acceptance only."""
    (m,) = family(1, seed=0)
    s = Sequencer(LlamaStage(m, max_len=64), SamplingParams(temperature=1.0, seed=3), index=1)
    # latencies that would switch speculation off, then ones that would make it pay: the
    # window is the one of the fixed cost line L(n) = 0.92 + 0.08 n with drafts at 0.3 L(1)
    for lat in ({2: (0.007, 1.0), 4: (0.010, 1.0)}, {2: (0.001, 1.0), 4: (0.0011, 1.0)}):
        s.policy.set_state(6.0, 3.0, lat)
        assert s.window(6) == 1  # a = 7/11: 1.64 / 1.38 beats 2.04 / 1.76 and alone's 1
        s.policy.set_state(18.0, 2.0, lat)
        assert s.window(6) == 3  # a = 19/22: 3.25 / 2.14, where g = 2 and 4 give 1.48, 1.51
    # an acceptance under 0.5 decodes alone (no clock needed), exploring after 8 steps
    s.policy.set_state(1.0, 8.0, {2: (0.001, 1.0), 4: (0.0011, 1.0)})
    assert [s.window(6) for _ in range(8)] == [0] * 7 + [1]


def test_seeded_pipespec_windows_adapt_to_timings() -> None:
    """A seeded PipeSpec run depends on thread timing anyway: its windows use the latencies,
    so speculation can switch off when it does not pay (seeded ar/sync stay timing-free)."""
    (m,) = family(1, seed=0)
    params = SamplingParams(temperature=1.0, seed=3)
    s = Sequencer(LlamaStage(m, max_len=64), params, index=1, reproducible=False)
    s.policy.set_state(1.0, 8.0, {2: (0.007, 1.0), 4: (0.010, 1.0)})
    assert s.window(6) == 0  # L(n) = 4 ms + 1.5 ms n and a = 2/11: decode alone pays more


def test_seeded_ar_and_sync_stay_reproducible_beside_timed_pipespec() -> None:
    models = family(2, noise=0.05, seed=4)
    stages = [LlamaStage(x, name=f"s{i}", max_len=256) for i, x in enumerate(models)]
    pipe = FastPipeline(stages)
    for mode in ("ar", "sync"):
        a = pipe.generate(PROMPT, 24, temperature=0.8, seed=5, ignore_eos=True, mode=mode)
        pipe.generate(PROMPT, 24, temperature=0.8, seed=9, ignore_eos=True, mode="pipespec")
        b = pipe.generate(PROMPT, 24, temperature=0.8, seed=5, ignore_eos=True, mode=mode)
        assert a.token_ids == b.token_ids


class OldRule:
    """The window rule as ``Sequencer`` implemented it before it moved onto
    ``pipespec_fast.analysis`` (its own weighted line fit and truncated geometric sum), kept
    here as the reference the policy must agree with (verbatim but for the seeded rule's
    fixed costs, added since)."""

    def __init__(self, timed: bool) -> None:
        self.timed, self.acc, self.rej, self.lat = timed, 0.0, 0.0, {}
        self.alone, self.every = 0, 8

    def note(self, n_feed: int, seconds: float, drafts: int, accepted: int) -> None:
        if n_feed <= 64:
            for k in list(self.lat):
                m, w = self.lat[k]
                if w * 0.95 < 0.05:
                    del self.lat[k]
                else:
                    self.lat[k] = (m, w * 0.95)
            mean, w = self.lat.get(n_feed, (seconds, 0.0))
            w += 1.0
            self.lat[n_feed] = (mean + (seconds - mean) / min(w, 5.0), w)
        if drafts:
            self.acc = 0.9 * self.acc + accepted
            self.rej = 0.9 * self.rej + float(accepted < drafts)

    def line(self):
        if len(self.lat) < 2:
            return None
        sw = swn = swt = swnn = swnt = 0.0
        for n, (mean, w) in self.lat.items():
            sw, swn, swt = sw + w, swn + w * n, swt + w * mean
            swnn, swnt = swnn + w * n * n, swnt + w * n * mean
        den = sw * swnn - swn * swn
        c1 = max(0.0, (sw * swnt - swn * swt) / den) if den > 0 else 0.0
        c0 = (swt - c1 * swn) / sw
        return None if c0 + c1 <= 0 else (c0, c1)

    def plan(self, max_n: int, cost: float):
        a = (self.acc + 1.0) / (self.acc + self.rej + 2.0)
        line = self.line() if self.timed else None
        if line is None:
            if self.timed and self.lat and 1 not in self.lat:
                return None
            if a >= 0.999:
                return max_n
            if not self.timed and a < 0.5:
                return 0
            if self.timed:
                return max(1, min(max_n, math.ceil(math.log(0.15) / math.log(a))))
            # seeded ar/sync since: the timed rule on a fixed line, drafts at 0.3 of a step
            line, cost = (0.92, 0.08), 0.3
        c0, c1 = line
        best, best_rate, expected = 0, 1.0 / (c0 + c1), 1.0
        for g in range(1, max(1, max_n) + 1):
            expected += a**g
            rate = expected / (c0 + c1 * (g + 1) + g * cost)
            if rate > best_rate:
                best, best_rate = g, rate
        return best

    def window(self, max_n: int, cost: float) -> int:
        best = self.plan(max_n, cost)
        if best is None:
            return 0
        if best == 0:
            self.alone += 1
            if self.alone < self.every:
                return 0
            self.every, best = min(64, 2 * self.every), 1
        else:
            self.every = 8
        self.alone = 0
        return best


@pytest.mark.parametrize("c0,c1,alpha,cost,max_n,timed", [
    (4e-3, 1.2e-3, 0.5, 0.0, 8, True),  # every row costs: short windows
    (4e-3, 1.5e-3, 0.2, 0.0, 6, True),  # speculation does not pay: 0, then explorations
    (10e-3, 0.05e-3, 0.85, 0.0, 12, True),  # rows nearly free (memory-bound): long windows
    (5e-3, 0.8e-3, 0.7, 2e-3, 8, True),  # drafting costs (synchronous decoding)
    (3e-3, 0.3e-3, 0.6, 0.4e-3, 48, True),  # the widest window allowed
    (4e-3, 1.5e-3, 0.4, 0.0, 6, False),  # seeded sampling: acceptance and fixed costs
    (4e-3, 1.5e-3, 0.8, 0.0, 6, False),
])
def test_policy_decides_as_the_old_rule_on_recorded_steps(c0, c1, alpha, cost, max_n, timed):
    """Latencies with noise and Bernoulli acceptances, fed step by step to the policy and to
    the rule it replaced: the same window at every step (and the same free-draft plan)."""
    rng = random.Random(7)
    policy, old = WindowPolicy(timed=timed), OldRule(timed)
    uncached = 1
    got = []
    for _ in range(400):
        g = policy.choose(max_n, cost)
        assert g == old.window(max_n, cost)
        assert policy.plan(max_n, 0.0) == old.plan(max_n, 0.0)
        accepted = next((j for j in range(g) if rng.random() > alpha), g)
        n_feed = uncached + g
        seconds = (c0 + c1 * n_feed) * (1 + 0.05 * (rng.random() - 0.5))
        policy.note_latency(n_feed, seconds)
        policy.note_verify(g, accepted)
        old.note(n_feed, seconds, g, accepted)
        got.append(g)
    assert len(set(got)) > 1  # the decisions really varied along the trace


# ------------------------------------------------------- the closed forms the window is built on


def test_weighted_fit_equals_the_fit_of_repeated_points():
    from pipespec_fast.analysis import LatencyModel

    ns, s = [1, 2, 4], [0.0051, 0.0058, 0.0079]
    w = LatencyModel.fit(ns, s, [2.0, 1.0, 3.0])
    r = LatencyModel.fit([1, 1, 2, 4, 4, 4], [s[0], s[0], s[1], s[2], s[2], s[2]])
    assert w.a == pytest.approx(r.a, rel=1e-12) and w.b == pytest.approx(r.b, rel=1e-12)
    assert LatencyModel.fit(ns, s, [1.0, 1.0, 1.0]) == LatencyModel.fit(ns, s)
    for bad, err in [([1.0, 0.0, 1.0], "positive"), ([1.0, 1.0], "expected 3 entries"),
                     ([1.0, float("inf"), 1.0], "finite")]:
        with pytest.raises(ValueError, match=err):
            LatencyModel.fit(ns, s, bad)


def test_one_acceptance_estimate():
    from pipespec_fast.analysis import acceptance_estimate, estimate_alpha
    from pipespec_fast.decoding.stats import StageStats

    assert acceptance_estimate(6, 2) == 0.75 and acceptance_estimate(0, 0) == 0.0
    assert acceptance_estimate(8.0, 2.0, prior=1.0) == 0.75  # Laplace: (8 + 1) / (10 + 2)
    assert estimate_alpha([2, 4, 0], 4) == acceptance_estimate(6, 2)  # 2 rejected steps
    st = StageStats("t", accepted=6, rejected=2)
    assert st.alpha == 0.75 and StageStats("t").alpha == 0.0
    p = WindowPolicy(timed=True)
    p.set_state(8.0, 2.0, {})
    assert p.acceptance == 0.75


def test_depth_acceptance_counts_the_depths_each_walk_tried():
    from pipespec_fast.decoding.stats import StageStats

    st = StageStats("t")
    st.record_verify(4, 2)  # chain: depths 1, 2 accepted, 3 rejected, 4 never tried
    assert (st.depth_tried, st.depth_accepted) == ([1, 1, 1], [1, 1, 0])
    st.record_verify(4, 4)  # all accepted: depth 5 (the bonus) is not a draft
    assert (st.depth_tried, st.depth_accepted) == ([2, 2, 2, 1], [2, 2, 1, 1])
    st.record_verify(6, 2, rejected=False)  # a tree walk that ended at a depth-2 leaf
    st.record_verify(6, 0, rejected=True)  # no child of the root accepted
    st.record_verify(0, 0)  # a step without drafts tries nothing
    assert (st.depth_tried, st.depth_accepted) == ([4, 3, 2, 1], [3, 3, 1, 1])
    assert st.depth_acceptance == [0.75, 1.0, 0.5, 1.0]
    d = st.as_dict()
    assert d["depth_tried"] == [4, 3, 2, 1] and d["depth_accepted"] == [3, 3, 1, 1]
    assert d["depth_acceptance"] == [0.75, 1.0, 0.5, 1.0]


def test_analysis_input_takes_step_sized_forwards_the_mean_window_the_verify_share_and_trees():
    from pipespec_fast.decoding.stats import StageStats, analysis_input

    draft, chain, tree = StageStats("d"), StageStats("c"), StageStats("t")
    for st in (draft, chain, tree):
        st.record_forward("prefill", 200, 0.0, 0.5, 0.0)  # a prompt: not a step's size
        st.record_forward("verify", 1, 0.0, 0.010, 0.0)
        st.record_forward("verify", 5, 0.0, 0.014, 0.0)
    chain.record_verify(4, 4)
    chain.record_verify(2, 0)
    chain.record_verify(0, 0)  # a step without drafts: not a window
    tree.record_verify(9, 3, rejected=False, tree=True)
    tree.record_verify(7, 1, rejected=True, tree=True)
    out = analysis_input([draft, chain], [1, 6])["stages"]
    assert out[0]["latency"] == {"n": [1, 5], "s": [0.010, 0.014]}
    assert out[1]["gamma"] == 3 and out[1]["alpha"] == 4 / 5  # (4 + 2) / 2 windows
    assert "accepted_per_verify" not in out[1]
    assert out[1]["verify_share"] == 2 / 3  # two of its three steps had drafts
    t = analysis_input([draft, tree], [1, 6])["stages"][1]
    assert (t["gamma"], t["accepted_per_verify"], t["verify_tokens"]) == (8, 3.0, 9.0)
    assert t["verify_share"] == 1.0
    fresh = analysis_input([draft, StageStats("x")], [1, 6])["stages"][1]
    assert fresh["gamma"] == 6  # verified nothing yet: its configured window
    assert "verify_share" not in fresh  # no step yet: the chain's share


def test_step_overhead_is_the_targets_time_outside_forwards_and_waits_per_step():
    from pipespec_fast.decoding.stats import StageStats, analysis_input, step_overhead_s

    t = StageStats("t")
    t.record_forward("prefill", 100, 0.0, 0.5, 0.0)
    t.record_forward("verify", 3, 0.6, 0.62, 0.0)  # the first step starts after a 0.1 s wait
    t.record_forward("verify", 1, 0.63, 0.64, 0.0)
    t.record_verify(2, 2)
    t.record_verify(0, 0)
    t.idle_s = 0.005
    # 0.7 s in all: from the first step (0.6) on, 0.1 s, of which 0.03 s forwards, 0.005 idle
    assert step_overhead_s(t, 0.7) == pytest.approx((0.1 - 0.03 - 0.005) / 2)
    assert step_overhead_s(StageStats("x"), 1.0) == 0.0
    d = StageStats("d")
    d.record_forward("draft", 1, 0.0, 0.001, 0.0)
    out = analysis_input([d, t], [1, 4], overhead_s=0.002)["stages"]
    assert out[1]["step_overhead_s"] == 0.002 and "step_overhead_s" not in out[0]
    assert "step_overhead_s" not in analysis_input([d, t], [1, 4])["stages"][1]


def test_best_window_is_the_speculation_ceilings_sync_window():
    from pipespec_fast.analysis import LatencyModel, best_window, speculation_ceiling

    line = LatencyModel.linear(4e-3, 1.2e-3)
    for alpha, cost, want in [(0.5, 0.0, 1), (0.73, 0.0, 3), (0.73, 2e-3, 1), (0.2, 0.0, 0)]:
        g, rate = best_window(line, alpha, cost, 8)
        c = speculation_ceiling(line, alpha, cost, 8)
        assert g == want == c.sync_gamma and rate == c.sync_tokens_per_s
