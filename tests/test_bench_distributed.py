"""``bench/distributed.py`` end to end on a tiny random family (with a word-level tokenizer):
one HumanEval and one MT-Bench prompt on both hierarchies, as threads and as two rank
processes. Proves the script runs, that both placements give the same greedy tokens, and
that the ranks exit cleanly; no timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import distributed as bench  # noqa: E402  (bench/distributed.py)
from test_distributed import _family_dirs  # noqa: E402


def test_bench_distributed_compares_threads_and_processes(tmp_path, capsys):
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    dirs, _ = _family_dirs(tmp_path, 2, seed=47, words=words)
    out = tmp_path / "distributed.json"
    code = bench.main(["--models", *dirs, "--prompts", "1", "--max-new-tokens", "12",
                       "--max-len", "512", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["rank_exit_codes"] == [0, 0] and data["meta"]["prompts"] == 2
    assert set(data["summary"]) == {"draft->target", "ngram->draft->target"}
    for h, d in data["summary"].items():
        assert d["same_output"] is True
        k = 3 if h.startswith("ngram") else 2
        for place in ("threads", "processes"):
            runs = data["runs"][h][place]
            assert [r["prompt"] for r in runs] == [0, 1]
            assert all(r["tokens"] == 12 and len(r["stages"]) == k for r in runs)
            s = d[place]
            assert s["tokens"] == 24 and s["tokens_per_s"] == 24 / s["seconds"]
            assert len(s["acceptance"]) == k - 1
            assert all(0 <= a <= 1 for a in s["acceptance"])
            assert 0 <= s["target_wait_share"] <= 1
        assert d["ratio_processes_threads"] == (d["processes"]["tokens_per_s"]
                                                / d["threads"]["tokens_per_s"])
    table = capsys.readouterr().out
    assert "| draft->target |" in table and "| ngram->draft->target |" in table


def test_merge_ranks_keeps_the_target_figures_and_every_stage():
    draft = {"tokens": 5, "seconds": 2.0, "stages": [{"name": "ngram"}, {"name": "d"}]}
    target = {"tokens": 5, "seconds": 1.0, "stages": [{"name": "ngram"}, {"name": "t"}]}
    merged = bench.merge_ranks([draft, target])
    assert merged["seconds"] == 1.0
    assert [s["name"] for s in merged["stages"]] == ["ngram", "d", "t"]


@pytest.mark.parametrize("rows,route", [("auto", "inline"), ("split", "split")])
def test_dist_latency_measures_every_path(tmp_path, rows, route):
    """``bench/dist_latency.py`` on a few trips and a tiny vocabulary: every path measured,
    the rows on the route asked for, received bit for bit."""
    import dist_latency

    out = tmp_path / "lat.json"
    assert dist_latency.main(["--trips", "5", "--vocab", "64", "--pin", "--rows", rows,
                              "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["trips"] == 5 and data["pin"] is True
    assert data["route"] == route and data["rows_exact"] is True
    for name in ("queue", "tcp", "raw", "chunk_sync", "chunk_rows"):
        assert 0 < data[name]["median_us"] <= data[name]["p90_us"], name
