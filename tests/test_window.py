"""The adaptive, cost-aware verification window (``Sequencer.window``: ``WindowPolicy``) and the
pipelines' use of a window of 0 (speculation switched off while it does not pay)."""

from __future__ import annotations

import itertools

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
    c0, c1 = line.a, line.b
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
    pipe = FastPipeline(stages)
    res = pipe.generate(PROMPT, 40, ignore_eos=True, mode=mode)
    assert res.token_ids == ref
    # both kinds of step happened (which stage verified what depends on thread timing)
    assert res.stage_stats[-1].verify_steps > 0
    assert sum(st.proposed for st in res.stage_stats[1:]) > 0


def test_seeded_sampling_windows_ignore_timings() -> None:
    """Seeded sampling must reproduce its draws: the window then follows acceptance only."""
    (m,) = family(1, seed=0)
    s = Sequencer(LlamaStage(m, max_len=64), SamplingParams(temperature=1.0, seed=3), index=1)
    # latencies that would switch speculation off
    s.policy.set_state(1.0, 8.0, {2: (0.007, 1.0), 4: (0.010, 1.0)})
    assert s.window(6) == 2  # a = 2/11: the smallest g with a^g <= 0.15
