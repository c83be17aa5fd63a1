"""Random argument combinations thrown at ``generate`` (hypothesis): each call either raises a
``ValueError`` with one line naming an argument, or returns exactly what the reference says
(greedy: the target's own greedy tokens; sampled: valid tokens, the requested count, and the
same tokens again for a seeded ``ar`` run)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipeline import stages_for, target_greedy

from pipespec_fast import FastPipeline

V = 64
ARGUMENTS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "mode",
             "timeout_s", "prompt")

prompts = st.one_of(st.lists(st.integers(0, V - 1), min_size=1, max_size=8),
                    st.sampled_from([[], [-1], [V], [1.0, 2.0], [True], b"\x01", "text", 3]))
kwargs = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0.0, 0, 0.7, 1.3, -1.0, math.nan, math.inf, 1e-45, "0.5",
                                    True]),
    "top_k": st.sampled_from([None, 1, 5, V + 10, 0, -2, True, 2.5]),
    "top_p": st.sampled_from([None, 0.5, 1.0, 0.0, 1.5, math.nan, True]),
    "seed": st.sampled_from([None, 0, 7, 2**31 - 1, -1, 2**31, True, 1.5]),
    "stop": st.sampled_from([None, "x", [], [""], 3]),
    "mode": st.sampled_from([None, "ar", "sync", "pipespec", "fast"]),
    "ignore_eos": st.booleans(),
    "timeout_s": st.sampled_from([None, 120, 0, -1, math.nan, math.inf]),
})
max_new = st.sampled_from([0, 1, 5, 12, -1, True, 3.0, "4"])


@pytest.fixture(scope="module")
def pipe():
    return FastPipeline(stages_for(2, seed=11), adaptive_windows=False)


@pytest.fixture(scope="module")
def reference(pipe):
    cache: dict[tuple, list[int]] = {}

    def greedy(prompt: list[int], n: int) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = target_greedy(pipe.stages[-1], prompt, 12)
        return cache[key][:n]

    return greedy


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, n=max_new, kw=kwargs)
def test_generate_is_right_or_refuses_with_one_line(pipe, reference, prompt, n, kw):
    try:
        res = pipe.generate(prompt, n, **kw)
    except ValueError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        assert any(a in msg for a in ARGUMENTS), msg
        return
    assert isinstance(n, int) and not isinstance(n, bool) and n >= 0
    assert len(res.token_ids) == n  # the tiny family declares no eos token
    assert all(0 <= t < V for t in res.token_ids)
    if kw.get("temperature", 0.0) == 0.0:
        assert res.token_ids == reference(list(prompt), n)
    elif kw.get("mode") == "ar" and kw.get("seed") is not None:
        again = pipe.generate(prompt, n, **kw)
        assert again.token_ids == res.token_ids
