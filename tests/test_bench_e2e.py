"""``bench/e2e.py``'s own machinery on a tiny random family (no default model, no peers): the
latency probe the speculation ceiling is fitted to, and the systems a pipeline yields."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other as modules

import e2e  # noqa: E402
import pytest  # noqa: E402
from tiny import family  # noqa: E402

from pipespec_fast import FastPipeline, LlamaStage  # noqa: E402


def _pipe(k: int = 2) -> FastPipeline:
    return FastPipeline([LlamaStage(m, name=f"s{i}", max_len=256)
                         for i, m in enumerate(family(k, seed=1))])


def test_probe_latency_times_every_size_of_target_and_draft() -> None:
    pipe = _pipe()
    out = e2e.probe_latency(pipe, ctx=24, ns=(1, 2, 4), reps=2, after=3)
    assert set(out) == {"target", "draft", "draft_after_verify"}
    assert set(out["target"]) == {1, 2, 4} and set(out["draft"]) == {1}
    assert set(out["draft_after_verify"]) == {1, 2, 3}
    assert all(v > 0 for role in out.values() for v in role.values())
    # the probe leaves the stages' own caches alone
    assert all(s.cache.length == 0 for s in pipe.stages)
    pipe.close()


def test_the_ceiling_charges_a_window_the_draft_steps_probed_after_a_verify() -> None:
    from pipespec_fast.analysis import LatencyModel, speculation_ceiling

    lat = {"target": {1: 3.0, 2: 3.25, 4: 3.75, 5: 4.0}, "draft": {1: 0.4},
           "draft_after_verify": {1: 1.1, 2: 0.5, 3: 0.4, 4: 0.4}}
    assert e2e.draft_steps_s(lat) == [1.1e-3, 0.5e-3, 0.4e-3, 0.4e-3]
    assert e2e.draft_steps_s(lat, model_drafts=False) == [0.0]
    assert e2e.draft_steps_s({"target": lat["target"], "draft": {1: 0.4}}) == [0.4e-3]
    line = LatencyModel.fit([1, 2, 4, 5], [3e-3, 3.25e-3, 3.75e-3, 4e-3])
    c = e2e.ceiling(lat, 0.7, 6)
    ref = speculation_ceiling(line, 0.7, [1.1e-3, 0.5e-3, 0.4e-3, 0.4e-3], 6)
    assert c["sync_tokens_per_s"] == ref.sync_tokens_per_s and c["draft_ms"][0] == 1.1
    # the steps after a verify cost more than the step alone: the bound is lower
    assert c["sync_tokens_per_s"] < speculation_ceiling(line, 0.7, 0.4e-3, 6).sync_tokens_per_s
    # JSON turns the sizes into strings: the same numbers from a results file
    import json

    assert e2e.ceiling(json.loads(json.dumps(lat)), 0.7, 6) == c


def test_needed_and_its_table_give_the_acceptance_each_goal_needs() -> None:
    import readme_tables

    from pipespec_fast.analysis import alpha_needed

    lat = {"target": {1: 3.0, 2: 3.25, 4: 3.75, 5: 4.0}, "draft": {1: 0.4},
           "draft_after_verify": {1: 1.1, 2: 0.5}}
    need = e2e.needed(lat, speedups=(1.2, 9.0), max_gamma=6)
    line = e2e.target_line(lat)
    assert need["1.2"]["free"] == alpha_needed(line, 1.2, 0.0, 6)
    assert need["1.2"]["sync"] == alpha_needed(line, 1.2, [1.1e-3, 0.5e-3], 6)
    assert 0 < need["1.2"]["free"] < need["1.2"]["sync"] < 1
    assert need["9"] == {"free": None, "sync": None}  # 7 tokens per 4.5 ms at best
    meta = {"task": "mtbench", "temperature": 0, "alpha_needed": need}
    summary = {"ours_sync": {"ceiling": {"alpha": 0.31}}}
    rows = readme_tables.needed_table([{"meta": meta, "summary": summary}])
    assert rows[2] == (f"| mtbench | 0 | 1.2x | {need['1.2']['sync']:.2f} | "
                       f"{need['1.2']['free']:.2f} | 0.31 | - |")
    assert rows[3] == "| mtbench | 0 | 9x | unreachable | unreachable | 0.31 | - |"


def test_make_systems_ours_pipelines_share_the_loaded_stages() -> None:
    pipe = _pipe(2)
    args = e2e._parser().parse_args(["--systems", "ours_ar,ours_sync2,ours_pipespec_ngram"])
    systems, skipped = e2e.make_systems(args, pipe)
    assert list(systems) == ["ours_ar", "ours_sync2"]
    assert "ours_pipespec_ngram" in skipped  # no model-free drafter in this hierarchy
    assert systems["ours_sync2"].pipe.stages[-1] is pipe.stages[-1]
    pipe.close()


def test_the_a_a_system_runs_our_ar_again_on_the_same_pipeline() -> None:
    pipe = _pipe(2)
    args = e2e._parser().parse_args(["--systems", "ours_ar,ours_ar_again"])
    systems, skipped = e2e.make_systems(args, pipe)
    assert not skipped and [s.mode for s in systems.values()] == ["ar", "ar"]
    assert systems["ours_ar_again"].pipe is systems["ours_ar"].pipe is pipe
    pipe.close()


def test_the_model_tree_system_runs_sync_with_the_drafts_trees() -> None:
    pipe = _pipe(2)
    args = e2e._parser().parse_args(["--systems", "ours_sync2_tree", "--tree-budget", "6"])
    systems, skipped = e2e.make_systems(args, pipe)
    sub = systems["ours_sync2_tree"].pipe
    assert (sub.mode, sub.tree_budget) == ("sync", 6) and not skipped
    assert sub.stages == [pipe.stages[0], pipe.stages[-1]]
    run = systems["ours_sync2_tree"].run([3, 1, 4, 1, 5, 9, 2, 6], 40, 0.0, seed=0)
    assert run["tokens"] == 40 and run["stages"][-1]["proposed"] > 0
    pipe.close()


def test_head_systems_put_the_feature_head_between_the_ngram_drafter_and_the_target() -> None:
    """``ours_*_head``: [n-gram -> feature head -> target] over the loaded stages; skipped,
    with the reason, when no head was loaded."""
    from test_feature_head import _head

    from pipespec_fast.stages.feature_head import FeatureHeadStage
    from pipespec_fast.stages.ngram import NGramStage

    target = LlamaStage(family(1, seed=1)[0], name="t", max_len=256)
    pipe = FastPipeline([NGramStage(target.vocab_size), target])
    args = e2e._parser().parse_args(["--systems", "ours_sync_head,ours_pipespec_head",
                                     "--head", ""])
    pipe.feature_head = None
    systems, skipped = e2e.make_systems(args, pipe)
    assert not systems and "tools/train_feature_head.py" in skipped["ours_sync_head"]
    pipe.feature_head = FeatureHeadStage(_head(target.model), target, name="h")
    systems, skipped = e2e.make_systems(args, pipe)
    assert not skipped
    for name, mode in (("ours_sync_head", "sync"), ("ours_pipespec_head", "pipespec")):
        sub = systems[name].pipe
        assert sub.mode == mode
        assert sub.stages == [pipe.stages[0], pipe.feature_head, target]
    run = systems["ours_sync_head"].run([3, 1, 4, 1, 5, 9, 2, 6], 24, 0.0, seed=0)
    assert run["tokens"] == 24
    pipe.close()


def test_a_system_run_reports_its_regimes_and_the_summary_their_share() -> None:
    pipe = _pipe(2)
    args = e2e._parser().parse_args(["--systems", "ours_sync2"])
    systems, _ = e2e.make_systems(args, pipe)
    runs = [systems["ours_sync2"].run([3, 1, 4, 1, 5, 9, 2, 6], 40, 0.0, seed=0)
            for _ in range(2)]
    assert all(sum(r["regime_steps"].values()) == r["stages"][-1]["verify_steps"]
               for r in runs)
    share = e2e.summarize({"ours_sync2": runs})["ours_sync2"]["regime_share"]
    steps = {a: sum(r["regime_steps"].get(a, 0) for r in runs) for a in share}
    assert share == {a: n / sum(steps.values()) for a, n in steps.items()}
    assert "full" in share and abs(sum(share.values()) - 1) < 1e-9
    pipe.close()


def test_summary_pools_the_targets_acceptance_per_depth_and_the_table_shows_it() -> None:
    import readme_tables

    def run(tried, accepted):
        st = {"acceptance_rate": 0.5, "mean_accepted_length": 1.5, "verify_steps": 4,
              "proposed": 8, "busy_s": 1.0, "alpha": 0.5}
        return {"tokens_per_s": 10.0, "seconds": 1.0,
                "stages": [dict(st), dict(st, depth_tried=tried, depth_accepted=accepted)]}

    runs = [run([4, 2], [2, 1]), run([4, 3, 1], [3, 1, 0])]
    d = e2e.summarize({"ours_pipespec2": runs})["ours_pipespec2"]
    assert d["depth_acceptance"] == [[5 / 8, 2 / 5, 0.0]]  # (2+3)/(4+4), (1+1)/(2+3), 0/1
    rows = readme_tables.depth_table([{"meta": {"task": "humaneval", "temperature": 0.7},
                                       "summary": {"ours_pipespec2": d}}])
    assert rows[2] == "| humaneval | 0.7 | ours_pipespec2 | 2.0 | 0% | 62%, 40%, 0% |"


def test_whole_run_ratio_and_its_interval_resample_the_prompts_in_pairs() -> None:
    from ratios import paired_ratio, predicted_run_rate, run_rate

    ar = [{"tokens": 96, "seconds": s, "tokens_per_s": 96 / s} for s in (0.5, 0.6, 0.4, 0.5)]
    # twice as fast on every prompt: every resample gives 2, the interval is a point
    fast = [dict(r, seconds=r["seconds"] / 2, tokens_per_s=2 * r["tokens_per_s"]) for r in ar]
    assert paired_ratio(fast, ar) == (2.0, 2.0, 2.0)
    # faster on two prompts, slower on two: the interval holds 1
    mixed = [dict(r, seconds=r["seconds"] * f)
             for r, f in zip(ar, (0.5, 2.0, 0.5, 2.0), strict=True)]
    ratio, lo, hi = paired_ratio(mixed, ar)
    assert ratio == run_rate(mixed) / run_rate(ar) and lo < 1.0 < hi
    assert run_rate(ar) == 4 * 96 / 2.0
    pred = [dict(r, predicted_tokens_per_s=96 / r["seconds"]) for r in ar]
    assert predicted_run_rate(pred) == run_rate(ar) and predicted_run_rate(ar) is None
    with pytest.raises(ValueError, match="3 runs against 4"):
        paired_ratio(ar[:3], ar)
    d = e2e.summarize({"ours_ar": ar, "ours_sync": fast})
    assert d["ours_sync"]["vs_ours_ar"] == [2.0, 2.0, 2.0]
    assert d["ours_sync"]["run_tokens_per_s"] == 2 * run_rate(ar)


def test_unseeded_runs_need_sampling_and_write_their_own_file(capsys) -> None:
    with pytest.raises(SystemExit) as e:  # refused before any model loads
        e2e.main(["--temperature", "0", "--unseeded"])
    assert e.value.code == 2 and "--unseeded: sampling only" in capsys.readouterr().err
    out = Path("/r")
    assert e2e.result_path(out, "mtbench", 0.7) == out / "e2e-mtbench-t0.7.json"
    assert e2e.result_path(out, "mtbench", 0.7, True) == out / "e2e-mtbench-t0.7-unseeded.json"
