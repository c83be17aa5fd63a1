"""``bench/aot_matrix.py``: every Triton kernel compiled ahead of time for sm_80 / sm_90 on the
CPU, over real models' head shapes, dtypes and block sizes; bf16 on sm_90 must not spill.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (this process has it set by
``conftest.py``, which turns the kernels into interpreted functions). The CI run compiles the
``ci`` subset (every bf16 sm_90 variant, one variant per tile choice elsewhere); the full matrix
is ``python bench/aot_matrix.py`` (docs/KERNELS.md has its figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import aot_matrix as M  # noqa: E402

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_verify_attention_kernel' for 'sm_80'
ptxas info    : Function properties for _verify_attention_kernel
    10544 bytes stack frame, 49544 bytes spill stores, 71960 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 10544 bytes cumulative stack size
"""


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("Triton's bundled ptxas is missing in this install")
    return res


def test_parse_ptxas_reads_registers_stack_and_spills():
    assert M.parse_ptxas(PTXAS_LOG) == dict(regs=32, stack=10544, spill_stores=49544,
                                            spill_loads=71960)
    with pytest.raises(ValueError, match="no ptxas -v figures"):
        M.parse_ptxas("ptxas info    : Compile time = 3.2 ms\n")


def test_ranges_fold_consecutive_values():
    assert M._ranges([7, 1, 2, 3, 5, 8, 2]) == "1-3,5,7-8"
    assert M._ranges([4]) == "4"


def _row(**kw):
    base = dict(kernel="k", arch="sm_90", models="llama3_8b", dtypes="bf16", n="1-4",
                tiles="BLOCK=16", regs=40, spill_stores=0, spill_loads=0)
    return {**base, **kw}


def test_failures_are_errors_anywhere_and_spills_in_bf16_on_sm90_only():
    assert M.failures([_row(), _row(arch="sm_80", spill_stores=8),
                       _row(dtypes="fp32", spill_loads=8)]) == []
    bad = M.failures([_row(spill_stores=16, spill_loads=24), _row(error="PTXASError: boom")])
    assert len(bad) == 2
    assert bad[0].startswith("bf16 sm_90 spills 16/24 B: k sm_90 llama3_8b bf16 n=1-4")
    assert bad[1].startswith("compile error: k sm_90") and "boom" in bad[1]
    # a variant shared by every dtype (the acceptance kernels) counts as bf16
    assert M.failures([_row(dtypes="bf16,fp16,fp32", spill_loads=4)])


def test_docs_table_has_one_row_per_tile_and_a_cell_per_arch_and_dtype():
    summary = [dict(kernel="k", arch="sm_90", models="m", dtypes="bf16", n="9-64",
                    tiles="GROUP=4 BLOCK_D=128 BLOCK_R=64 DOT_PREC=tf32", warps=8, regs="139-141",
                    spill_stores=0, spill_loads=0, shared=98304),
               dict(kernel="k", arch="sm_80", models="m", dtypes="fp32", n="9-64",
                    tiles="GROUP=4 BLOCK_D=128 BLOCK_R=64 DOT_PREC=ieee", warps=8, regs="255",
                    spill_stores=3380, spill_loads=2000, shared=122880)]
    split = dict(summary[0], tiles="GROUP=4 BLOCK_D=128 BLOCK_R=64 DOT_PREC=tf32 LEN_PTR=True "
                                   "SPLIT=True", regs="150", shared=49152)
    header, rule, line, split_line = M.pivot([*summary, split])
    assert header.startswith("| kernel | models | n | tiles | warps | sm_80 bf16 |")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["k", "m", "9-64", "BLOCK_R=64", "8"]
    assert cells[5:] == ["", "", "255 / 120K / **spill 3.3K**", "139-141 / 96K", "", ""]
    # the switches that are on tell the split / tensor-length program apart
    cells = [c.strip() for c in split_line.strip("|").split("|")]
    assert cells[3] == "BLOCK_R=64 LEN_PTR SPLIT" and cells[8] == "150 / 48K"


def _variant(arch, dtype, tiles, uses):
    v = M.Variant("verify_attention", "m", "k", arch, {}, {}, {}, {}, {"BLOCK_R": tiles}, "")
    v.uses = [M.Case("llama3_8b", dtype, n, "chain", ctx) for n, ctx in uses]
    return v


def test_ci_subset_keeps_all_bf16_sm90_and_the_largest_generic_variant_per_tile():
    bf16 = [_variant(90, "bf16", 64, [(9, 1)]), _variant(90, "bf16", 64, [(10, 100)])]
    small = _variant(80, "fp16", 16, [(1, 4096)])
    big = [_variant(80, "fp16", 64, [(64, 1)]), _variant(80, "fp16", 64, [(64, 4096)]),
           _variant(80, "fp16", 64, [(63, 4096)]), _variant(80, "fp16", 64, [(64, 4096)])]
    other_arch = _variant(90, "fp16", 64, [(9, 4096)])
    everything = [*bf16, small, *big, other_arch]
    assert M.select(everything, "full") == everything
    assert M.select(everything, "ci") == [*bf16, small, big[1], other_arch]


def test_the_matrix_follows_the_launchers_tile_choices():
    """Collected (not compiled) in a subprocess, for a GPU of ``M.SMS`` SMs: every verify
    launch of every model, n, context and length form lands in exactly one attention variant,
    whose constexprs are the launcher's for that launch (``_tile_sizes``; ``SPLIT`` where
    ``kv_splits`` and the host-int rule of ``_auto_splits`` split; ``LEN_PTR`` for a tensor
    length) and whose split count is specialised as that count would be; the combine kernel
    serves exactly the split launches, on ``COMBINE_ROWS``-row tiles. The stochastic launcher
    is recorded as its four kernels on ``min(2048, next_pow2(V))``-entry chunks. Launches that
    Triton would compile alike are one variant: with ``n`` and ``cache_len`` unspecialised, a
    handful per model."""
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, "bench")
        import aot_matrix as M
        import triton
        from pipespec_fast.kernels import verify_attention as V

        def split_count(u):
            m = u.shape
            s = V.kv_splits(u.n, m.kv_heads, M.cache_slots(u), M.SMS)
            return 1 if u.length == "int" and u.context <= V.MIN_SPLIT_KEYS else s

        def count_spec(s):  # Triton's integer classes of num_splits
            return "num_splits=1" if s == 1 else "num_splits%16" if s % 16 == 0 else None

        vs = M.collect(M.KERNELS[:1], [90], list(M.MODELS), ["bf16"], M.NS)
        uses, bad, split_uses, combine_uses, flags = 0, [], set(), set(), set()
        for v in vs:
            for u in v.uses:
                m, s = u.shape, split_count(u)
                group = m.n_heads // m.kv_heads
                r, d, nb = V._tile_sizes(u.n * group, m.head_dim, None, None)
                common = dict(GROUP=group, HEAD_DIM=m.head_dim, BLOCK_D=d, BLOCK_N=nb,
                              LEN_PTR=u.length == "tensor", ALIGNED=False)
                spec = set(v.spec.split())
                counts = {x for x in spec if x.startswith("num_splits")}
                want_count = {count_spec(s)} - {None}
                if v.kernel == "_verify_attention_kernel":
                    uses += 1
                    want = dict(common, BLOCK_R=r, DOT_PREC="tf32", SPLIT=s > 1)
                    flags.add((u.model, s > 1, u.length))
                    if s > 1:
                        split_uses.add(u)
                elif v.kernel == "_combine_kernel":
                    want = dict(common, BLOCK_R=V.COMBINE_ROWS)
                    combine_uses.add(u)
                else:
                    want = None
                if v.tiles != want or counts != want_count or v.options["num_warps"] != (
                        V.ATTENTION_WARPS if v.kernel == "_verify_attention_kernel" else 4):
                    bad.append(repr((u, v.kernel, v.tiles, v.spec)))
        vs_acc = M.collect(M.KERNELS[3:], [90], list(M.MODELS), ["bf16"], M.NS)
        for v in vs_acc:
            for u in v.uses:
                block_v = min(2048, triton.next_power_of_2(u.shape.vocab))
                if v.kernel != "_race_combine_kernel" and v.tiles["BLOCK_V"] != block_v:
                    bad.append(repr((u, v.kernel, v.tiles)))
        print(json.dumps(dict(
            variants=len(vs), uses=uses, bad=bad[:5], n_bad=len(bad),
            kernels=sorted({v.kernel for v in vs}), flags=len(flags),
            split_uses=len(split_uses), combine_is_split=combine_uses == split_uses,
            acceptance=sorted({v.kernel for v in vs_acc}))))
        """
    )
    res = _run(["-c", script], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_bad"] == 0, out["bad"]
    assert out["kernels"] == ["_combine_kernel", "_verify_attention_kernel"]
    assert out["uses"] == (len(M.MODELS) * len(M.NS) * len(M.FORMS) * len(M.CONTEXTS)
                           * len(M.LENGTHS))
    # split and unsplit launches both occur, the combine runs after exactly the split ones
    assert 0 < out["split_uses"] < out["uses"] and out["combine_is_split"]
    # per model: unsplit with an int length (short contexts), split with an int and a tensor
    assert out["flags"] == 3 * len(M.MODELS)
    assert 3 * len(M.MODELS) <= out["variants"] <= 40
    assert out["acceptance"] == ["_race_chunks_kernel", "_race_combine_kernel",
                                 "_row_sums_kernel", "_stochastic_walk_kernel"]


@pytest.mark.slow
def test_ci_matrix_compiles_everywhere_and_bf16_on_sm90_never_spills(tmp_path):
    out = tmp_path / "aot"
    res = _run(["bench/aot_matrix.py", "--subset", "ci", "--check", "--out", str(out)],
               timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["variants"]
    assert report["errors"] == 0 and report["failures"] == []
    kernels = {"_verify_attention_kernel", "_combine_kernel", "_kv_compact_kernel",
               "_greedy_kernel", "_row_sums_kernel", "_stochastic_walk_kernel",
               "_race_chunks_kernel", "_race_combine_kernel"}
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
        for dtype in M.DTYPES:  # unsplit and split attention, int and tensor length
            tiles = {r["tiles"] for r in rows if r["arch"] == arch and dtype in r["dtypes"]
                     and r["kernel"] == "_verify_attention_kernel"}
            assert {("SPLIT=True" in t, "LEN_PTR=True" in t) for t in tiles} == {
                (False, False), (True, False), (True, True)}, (arch, dtype, tiles)
    bf16_sm90 = [r for r in rows if r["arch"] == "sm_90" and "bf16" in r["dtypes"]]
    assert {r["kernel"] for r in bf16_sm90} == kernels
    assert all(r["spill_stores"] == r["spill_loads"] == 0 and r["regs"] > 0 for r in bf16_sm90)
    assert "| _verify_attention_kernel | sm_90 |" in out.with_suffix(".md").read_text()
