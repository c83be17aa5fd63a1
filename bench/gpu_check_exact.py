"""Batch-invariant mode's part of ``gpu_check.py`` (``PIPESPEC_BATCH_INVARIANT=1``; docs/KERNELS.md,
"GPU numerics"): model stages that run every forward in 64-row blocks (captured graphs) with the
aligned attention.

* ``exact/rows``: on the realistic-shape random target, a token's logits are the same bits
  decoded alone, as a row of a 9-token chain and of a 70-token chunked block (the claim the
  mode rests on: one GEMM shape per stage, and the aligned attention). Required on CUDA; on a
  dry run the CPU's BLAS and the interpreter's numpy dot give a row's bits by its place in the
  matrix, so there the equality is recorded, not required (``tests/test_exact_mode.py`` and
  ``tests/test_exact_attention.py`` prove the logic on the CPU with position-free products).
* ``exact/greedy``: pipespec and sync with exact stages emit exact AR's tokens (bf16 on CUDA,
  where near-ties are common), and the cost of exactness: AR tokens/s of the exact stage
  against the default stage (eager, and with power-of-two graphs), interleaved, plus the
  target's forward of one token after ``FORWARD_CONTEXT`` cached ones in each form.

About 30 s on an H200: one stage pair, one 64-row bucket captured per stage.
"""

from __future__ import annotations

import time

import torch
from gpu_check_common import Section, Sizes, time_ms
from gpu_check_models import FORWARD_CONTEXT, _first_difference, _prompt, build_pair

from pipespec_fast import FastPipeline, LlamaStage


def _dtype(sz: Sizes) -> torch.dtype:
    return torch.bfloat16 if sz.cuda else torch.float32


def _exact(stage: LlamaStage) -> LlamaStage:
    """The same model as an exact stage (its own cache, one bucket of 64 captured now)."""
    return LlamaStage(stage.model, name=stage.name, max_len=stage.max_len, batch_invariant=True)


def check_exact_rows(sz: Sizes) -> dict:
    _, target = build_pair(sz, _dtype(sz), 6)
    stage = _exact(target)
    g = torch.Generator().manual_seed(8)
    toks = torch.randint(0, sz.model["vocab_size"], (sz.prompt + 80,), generator=g)
    toks = toks.to(sz.device)
    start = sz.prompt
    stage.forward(toks[:start], last_n=1)
    alone = [stage.forward(toks[start + i].view(1))[0].clone() for i in range(70)]
    out = {}
    for n in (9, 70):
        stage.rollback(start)
        block = stage.forward(toks[start : start + n]).clone()
        diff = [i for i in range(n) if not torch.equal(block[i], alone[i])]
        out[f"chain{n}"] = {"rows_differing": len(diff), "first": diff[0] if diff else None,
                            "max_abs": float((block - torch.stack(alone[:n])).abs().max())}
    same = all(r["rows_differing"] == 0 for r in out.values())
    return {"ok": same or not sz.cuda, "bit_identical": same, "required": sz.cuda,
            "dtype": str(_dtype(sz)).removeprefix("torch."), "captured": stage.steps.capture,
            **out}


def _ar_tokens_per_s(stage: LlamaStage, prompt: list[int], new: int, sz: Sizes) -> tuple:
    pipe = FastPipeline([stage])
    if sz.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = pipe.generate(prompt, new, ignore_eos=True).token_ids
    wall = time.perf_counter() - t0
    return ids, round(len(ids) / wall, 2)


def check_exact_greedy(sz: Sizes) -> dict:
    """Exact pipespec / sync = exact ar, bit for bit; ar's speed exact vs default."""
    dtype = _dtype(sz)
    draft, target = build_pair(sz, dtype, 7)
    ex_draft, ex_target = _exact(draft), _exact(target)
    graphs = LlamaStage(target.model, name="target", max_len=target.max_len)
    graphs.use_captured_steps()  # the PIPESPEC_GRAPHS=1 buckets, for the cost's two parts
    prompt, new = _prompt(sz), sz.new_tokens
    for s in (target, graphs, ex_target):  # warm-up: compiles, first launches
        _ar_tokens_per_s(s, prompt, 4, sz)
    speed = {"ar_default": [], "ar_graphs": [], "ar_exact": []}
    tokens = {}
    for _ in range(2):  # interleaved
        for name, s in (("ar_default", target), ("ar_graphs", graphs), ("ar_exact", ex_target)):
            tokens[name], tps = _ar_tokens_per_s(s, prompt, new, sz)
            speed[name].append(tps)
    out = {"dtype": str(dtype).removeprefix("torch."), "new_tokens": new,
           "tokens_per_s": {k: max(v) for k, v in speed.items()},
           "exact_ar_vs_default_ar_first_difference": _first_difference(tokens["ar_exact"],
                                                                         tokens["ar_default"])}
    pipe = FastPipeline([ex_draft, ex_target], adaptive_windows=False)
    for mode in ("sync", "pipespec"):
        r = pipe.generate(prompt, new, ignore_eos=True, mode=mode)
        st = r.stage_stats[-1]
        out[mode] = {"first_difference_from_exact_ar": _first_difference(r.token_ids,
                                                                         tokens["ar_exact"]),
                     "proposed": st.proposed, "accepted": st.accepted}
    pipe.close()
    out["forward_one_token"] = _forward_cost(sz, target, graphs, ex_target)
    ok = all(out[m]["first_difference_from_exact_ar"] is None for m in ("sync", "pipespec"))
    return {"ok": ok and out["pipespec"]["accepted"] + out["sync"]["accepted"] > 0, **out}


def _forward_cost(sz: Sizes, target: LlamaStage, graphs: LlamaStage, exact: LlamaStage) -> dict:
    """One token's forward after ``FORWARD_CONTEXT`` cached slots: eager, power-of-two graph
    (bucket 1) and exact (bucket 64), device time (random cache contents)."""
    ctx = FORWARD_CONTEXT[sz.device]
    tok = torch.zeros(1, dtype=torch.int64, device=sz.device)
    out = {"context": ctx}
    for name, s in (("default", target), ("graphs", graphs), ("exact", exact)):
        def step(s=s):
            s.cache.length = ctx
            s.forward(tok)

        out[name] = time_ms(step, sz.device, sz.iters)
        s.cache.length = 0
    out["exact_over_default"] = round(out["exact"]["median_ms"] / out["default"]["median_ms"], 3)
    out["exact_over_graphs"] = round(out["exact"]["median_ms"] / out["graphs"]["median_ms"], 3)
    return out


def exact_checks(sec: Section, sz: Sizes) -> None:
    sec.run("exact/rows", "correctness", check_exact_rows, sz)
    sec.run("exact/greedy", "correctness", check_exact_greedy, sz)
