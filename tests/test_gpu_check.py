"""``scripts/gpu_check.sh --dry-run``: the GPU check's code paths on CPU (Triton's interpreter,
tiny sizes), so the script is known to run before a GPU is lent; and its bookkeeping (a failing
or raising check is recorded, the run goes on, the budget cuts the tail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from gpu_check_common import DRY, Section  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    # The budgets and the watchdog's deadline are sized for an H200; here the interpreter
    # shares 2 cores with another pytest worker (~160-220 s), and this run is about coverage
    # (the budget and deadline cuts have tests of their own below).
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out),
                          "--budget-scale", "4", "--deadline", "840"],
                         cwd="/", env=env, capture_output=True, text=True, timeout=900)
    return res, json.loads(out.read_text()) if out.exists() else None


def _checks(report, section):
    return {c["name"]: c for c in report["sections"][section]["checks"]}


def test_dry_run_passes_every_correctness_check(dry_run):
    res, report = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[gpu_check] OK" in res.stdout
    assert report["schema"] == 1 and report["dry_run"] is True
    assert list(report["sections"]) == list(gpu_check.BUDGETS)
    s = report["summary"]
    assert s["ok"] and s["fail"] == s["error"] == s["skipped"] == 0 and s["failed_checks"] == []
    for sec in report["sections"].values():
        for c in sec["checks"]:
            assert c["status"] == ("pass" if c["kind"] == "correctness" else "measured"), c
            assert c["wall_s"] >= 0 and isinstance(c["result"], dict)


def test_dry_run_runs_the_repository_files_through_the_interpreter(dry_run):
    _, report = dry_run
    env = report["environment"]
    assert env["device"] == "cpu" and env["triton_interpret"] == "1"
    # the script links the checkout's csrc_triton/ in as pipespec_fast.kernels (no install)
    assert env["kernels_from"].endswith("pipespec_fast/kernels")
    assert not env["kernels_from"].startswith(str(ROOT))


def test_dry_run_covers_every_shape_dtype_and_block(dry_run):
    _, report = dry_run
    kernels = _checks(report, "kernels")
    for shape in DRY.heads:
        for dt in ("float32", "float16"):
            for kind, n in DRY.blocks:
                c = kernels[f"verify_attention/{shape}/{dt}/{kind}{n}"]
                assert c["result"]["cache_append_exact"] and c["result"]["max_abs_err"] < 1e-2
            assert kernels[f"kv_compact/{shape}/{dt}"]["result"]["bit_exact"]
        for kind, n in DRY.blocks:  # the split path, forced, in the production dtype
            c = kernels[f"verify_attention_split/{shape}/float16/{kind}{n}"]["result"]
            assert c["splits_used"] >= 2 and c["tensor_cache_len_bit_exact"]
            assert c["cache_append_exact"] and c["max_abs_err"] < 1e-2
            c = kernels[f"verify_attention_unsplit/{shape}/float16/{kind}{n}"]
            assert c["status"] == "pass" and c["result"]["max_abs_err"] < 1e-2
    for kind, n in DRY.blocks:
        assert kernels[f"greedy_accept/{kind}{n}"]["result"]["mismatches"] == 0
        assert kernels[f"stochastic_accept/{kind}{n}/V{DRY.vocab}"]["result"]["mismatches"] == 0
    chi = _checks(report, "sampling")["stochastic_accept/chi_square_first_token"]["result"]
    assert chi["draws"] == DRY.draws == sum(chi["counts"]) and chi["p_value"] > 1e-3
    eq = _checks(report, "models")["greedy_equality/float32"]["result"]
    assert eq["sync"]["first_difference_from_ar"] is None
    assert eq["pipespec"]["first_difference_from_ar"] is None
    assert eq["sync"]["proposed"] > 0
    cap = _checks(report, "models")["captured_steps/float32"]["result"]
    assert cap["exact"] and set(cap["blocks"]) == {"chain1", "chain5", "chain9", "tree12",
                                                   "captured"}
    assert cap["generation"]["replays"]["target"] > 0
    ng = _checks(report, "models")["ngram_draft_target/float32"]["result"]
    for mode in ("sync", "pipespec"):
        assert ng[mode]["first_difference_from_ar"] is None
        assert ng[mode]["sampled_tokens"] == DRY.new_tokens


def test_dry_run_records_the_benchmark_figures(dry_run):
    _, report = dry_run
    bench = _checks(report, "kernel_benchmarks")
    assert bench["hbm_copy_bandwidth"]["result"]["gb_per_s"] > 0
    for ctx in DRY.contexts:
        r = bench[f"attention_vs_sdpa/group3/float16/ctx{ctx}/n9"]["result"]
        assert r["context"] == ctx and r["ours"]["median_ms"] > 0 and r["sdpa"]["median_ms"] > 0
        assert "ours_pct_of_copy_bw" in r
        assert r["ours_unsplit"]["median_ms"] > 0 and r["num_splits"] == 1  # no SMs on a CPU
        assert r["max_abs_err"] < 1e-2
    acc = bench[f"accept_latency/chain9/V{DRY.vocab}"]["result"]
    assert acc["greedy"]["median_ms"] > 0 and acc["stochastic"]["median_ms"] > 0
    models = _checks(report, "model_benchmarks")
    fwd = models["forward/float32"]["result"]
    assert all(fwd[f"n{n}"]["host_enqueue_median_ms"] > 0 for n in (1, 9))
    graphs = fwd["graphs"]
    assert graphs["captured"] is False  # the CPU: the captured steps' code, run eagerly
    for n in (1, 9):
        g = graphs[f"n{n}"]
        assert g["eager"]["median_ms"] > 0 and g["graphs"]["host_enqueue_median_ms"] > 0
        assert g["graphs_speedup"] > 0 and g["graphs_host_share"] > 0
    setup = models["modes/float32/setup_and_ar"]["result"]
    assert setup["draft"]["n_layers"] == DRY.bench_draft["n_layers"]
    assert setup["target"]["n_layers"] == DRY.bench_target_layers
    assert setup["target"]["params"] > setup["draft"]["params"] and setup["graphs"] is False
    assert setup["ar"]["tokens_per_s"] > 0
    a = DRY.acceptances[0]
    for name in [f"oracle_a{x}" for x in DRY.acceptances] + [f"ngram_oracle_a{a}"]:
        res = models[f"modes/float32/{name}"]["result"]  # a pass: every mode emitted ar's
        for m in ("ar", "sync", "pipespec", "sync_fixed", "pipespec_fixed"):
            assert res[m]["tokens_per_s"] > 0 and res[m]["first_difference_from_ar"] is None
        assert res["pipespec_over_ar"] > 0 and res["pipespec_over_sync"] > 0
        assert res["sync_fixed"]["proposed"] > 0 and 0 < res["measured_acceptance"] <= 1
    assert models[f"modes/float32/ngram_oracle_a{a}"]["result"]["stages"][0] == "ngram"


def test_dry_run_runs_the_exact_mode_checks(dry_run):
    """The exact section runs its code; bit-identical rows are required on CUDA only (the
    CPU's BLAS and the interpreter's dot round a row by its place: recorded here)."""
    _, report = dry_run
    exact = _checks(report, "exact")
    rows = exact["exact/rows"]["result"]
    assert rows["required"] is False and rows["captured"] is False
    assert set(rows) >= {"chain9", "chain70", "bit_identical"}
    greedy = exact["exact/greedy"]["result"]
    for mode in ("sync", "pipespec"):
        assert greedy[mode]["first_difference_from_exact_ar"] is None
    assert greedy["sync"]["accepted"] + greedy["pipespec"]["accepted"] > 0
    assert all(greedy["tokens_per_s"][k] > 0 for k in ("ar_default", "ar_graphs", "ar_exact"))
    fwd = greedy["forward_one_token"]
    assert fwd["exact"]["median_ms"] > 0 and fwd["exact_over_default"] > 0


def test_a_failing_or_raising_check_is_recorded_and_the_run_goes_on():
    sec = Section("s", budget_s=60)
    sec.run("good", "correctness", lambda: {"ok": True, "x": 1})
    sec.run("bad", "correctness", lambda: {"ok": False})
    sec.run("boom", "benchmark", lambda: 1 / 0)
    sec.run("bench", "benchmark", lambda: {"ms": 2.0})
    got = [(c["name"], c["status"]) for c in sec.checks]
    assert got == [("good", "pass"), ("bad", "fail"), ("boom", "error"), ("bench", "measured")]
    assert "ZeroDivisionError" in sec.checks[2]["error"]
    s = gpu_check.summary({"s": sec.to_json()})
    assert not s["ok"] and s["failed_checks"] == ["bad", "boom"] and s["pass"] == 1


def test_a_spent_budget_skips_the_rest():
    sec = Section("s", budget_s=0)
    assert sec.run("late", "correctness", lambda: {"ok": True}) is None
    assert sec.checks[0]["status"] == "skipped"
    s = gpu_check.summary({"s": sec.to_json()})
    assert s["ok"] and not s["complete"]  # skipped is not failed, but the check is incomplete
    assert s["skipped_correctness"] == ["late"]


def test_a_real_run_refuses_a_machine_without_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        gpu_check.run(gpu_check.parse_args([str(tmp_path / "x.json")]))


def test_a_hung_run_is_aborted_with_its_json_written(tmp_path):
    """The watchdog: past ``--deadline`` the JSON names the running check, exit code 1."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run",
                          "--deadline", "1", str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "ABORTED" in res.stdout, res.stdout + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["aborted"].startswith("deadline of 1 s reached during kernels/")
    assert report["summary"]["ok"] is False
