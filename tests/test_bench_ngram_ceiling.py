"""``bench/ngram_ceiling.py``: teacher-forced chains against fresh drafters, and the decode
times and ratios of its window rules on chains whose outcome is known."""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ngram_ceiling as C  # noqa: E402
import pytest  # noqa: E402

from pipespec_fast.stages.ngram import NGramStage  # noqa: E402
from pipespec_fast.stages.ngram_store import NGramStore  # noqa: E402


def _line(n: int) -> float:  # L(n) = 10 ms + 1 ms per token past the first
    return 0.010 + 0.001 * (n - 1)


@pytest.mark.parametrize("with_store", [False, True])
def test_chains_are_what_a_fresh_drafter_proposes_after_each_prefix(with_store):
    rng = random.Random(3)
    prompt = [rng.randrange(12) for _ in range(30)]
    answer = prompt[5:17] + [rng.randrange(12) for _ in range(10)]  # a copied stretch, then new
    store = NGramStore([[rng.randrange(12) for _ in range(40)] for _ in range(5)], 12) \
        if with_store else None
    drafter = NGramStage(12, store=store)
    chains = C.teacher_forced_chains(drafter.clone(), prompt, answer, 4)  # as main() runs it
    assert len(chains) == len(answer)
    for p, chain in enumerate(chains):
        fresh = NGramStage(12, store=store)
        tok = fresh.propose(prompt + answer[:p])
        want = []
        for j in range(4):
            want.append(p + j < len(answer) and tok == answer[p + j])
            tok = fresh.propose([tok])
        assert chain == want, p
    assert any(all(c) for c in chains) and not all(all(c) for c in chains)


def test_decode_time_commits_the_accepted_run_and_the_targets_token():
    right = [[True] * 3] * 9
    # window 2: 3 tokens per step at L(3): 9 tokens in 3 steps
    assert C.decode_seconds(right, _line, C.fixed(2)) == pytest.approx(3 * _line(3))
    assert C.decode_seconds(right, _line, C.fixed(0)) == pytest.approx(9 * _line(1))
    mixed = [[True, False, True], [False] * 3, [True, True, True], [True] * 3]
    # window 3: step at 0 commits 2 (one accepted), step at 2 commits 4 (runs past the end)
    assert C.decode_seconds(mixed, _line, C.fixed(3)) == pytest.approx(2 * _line(4))
    assert C.accepted([True, False, True], 3) == 1 and C.accepted([True], 5) == 1


def test_the_perfect_window_is_the_fastest_sequence_of_windows():
    rng = random.Random(1)
    steep = {1: 10.0, 2: 10.5, 3: 14.0, 4: 14.5}.__getitem__  # a block of 3 costs a lot
    for _ in range(30):
        chain = [[rng.random() < 0.7 for _ in range(3)] for _ in range(7)]

        def brute(p, chain=chain):  # every sequence of windows from position p
            if p >= len(chain):
                return 0.0
            return min(steep(g + 1) + brute(p + C.accepted(chain[p], g) + 1, chain)
                       for g in range(4))

        assert C.perfect_seconds(chain, steep) == pytest.approx(brute(0))


def test_the_perfect_window_beats_every_fixed_one_and_ratios_add_the_prefill():
    rng = random.Random(0)
    chains = [[[rng.random() < 0.6 for _ in range(6)] for _ in range(50)] for _ in range(4)]
    rules = {g: C.fixed(g) for g in range(7)}
    r = C.ratios(chains, [0.05] * 4, _line, rules)
    assert r[0] == pytest.approx((1.0, 1.0))
    assert all(r["perfect window"][0] > r[g][0] for g in range(7))
    # end to end: the same prefill added to both times pulls a ratio towards 1
    for dec, whole in r.values():
        assert min(dec, 1.0) <= whole <= max(dec, 1.0)
    ar = sum(len(c) for c in chains) * _line(1)
    t = sum(C.decode_seconds(c, _line, C.fixed(2)) for c in chains)
    assert r[2] == pytest.approx((ar / t, (0.2 + ar) / (0.2 + t)))


@pytest.mark.parametrize("flag", ["--window", "--prompts", "--max-new-tokens"])
def test_sizes_below_one_are_refused_before_anything_loads(flag, capsys):
    with pytest.raises(SystemExit) as e:
        C.main([flag, "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
