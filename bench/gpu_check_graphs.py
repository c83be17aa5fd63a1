"""The captured steps' part of ``gpu_check.py`` (``pipespec_fast/decoding/captured.py``): a
replayed CUDA graph gives its eager static step's logits bit for bit and greedy decoding with
graphs emits ar's tokens (a correctness check); a forward's device time and host enqueue time
with and without graphs (a benchmark). On a dry run the steps run eagerly on the CPU (no
graphs there): the same code, so the check is known to run.

The block check captures the buckets it uses (1, 8, 16); the generations capture all seven
per stage before they start, as ``PIPESPEC_GRAPHS=1`` does at load.
"""

from __future__ import annotations

import torch
from gpu_check_common import Sizes, host_and_device_ms, sync, time_ms
from gpu_check_models import FORWARD_CONTEXT, _first_difference, _prompt, build_pair

from pipespec_fast import FastPipeline
from pipespec_fast.decoding.captured import StaticSteps

BLOCKS = ((1, None), (5, None), (9, None), (12, (-1, 0, 0, 1, 2, -1, 5, 3, 3, 6, 9, 10)))


def _zeroed_cache(model):
    c = model.new_cache(FORWARD_CONTEXT["cpu"] * 8)
    c.k.zero_()
    c.v.zero_()
    return c


def _blocks_agree(sz: Sizes, target) -> dict:
    """Each block on three caches holding the same prefix: the eager unpadded forward, the
    eager static step and the captured one (bit-identical to the second; the first differs
    where cuBLAS rounds by batch size, reported)."""
    model = target.model
    caches = [_zeroed_cache(model) for _ in range(3)]
    prefix = torch.tensor(_prompt(sz), device=sz.device)
    for c in caches:
        model(prefix, c)
    eager_steps = StaticSteps(model, caches[1], capture=False)
    graph_steps = StaticSteps(model, caches[2])
    out, exact = {}, True
    gen = torch.Generator().manual_seed(4)
    for n, parents in BLOCKS:
        toks = torch.randint(0, sz.model["vocab_size"], (n,), generator=gen).to(sz.device)
        par = None if parents is None else torch.tensor(parents, device=sz.device)
        want = model(toks, caches[0], parents=par)
        static = eager_steps.forward(toks, parents=par).clone()
        got = graph_steps.forward(toks, parents=par)
        same = bool(torch.equal(got, static))
        exact = exact and same
        out[f"{'chain' if par is None else 'tree'}{n}"] = {
            "captured_equals_eager_static": same,
            "max_abs_vs_unpadded": float((got - want).abs().max()),
            "argmax_agrees_with_unpadded": bool(torch.equal(got.argmax(-1), want.argmax(-1)))}
    out["captured"] = graph_steps.capture
    return {"exact": exact, "blocks": out}


def check_captured_steps(sz: Sizes, dtype: torch.dtype) -> dict:
    """A captured bucket replays its eager step exactly; sync and pipespec with every model
    stage on captured steps emit ar's tokens (ar without graphs)."""
    draft, target = build_pair(sz, dtype, 5)
    res = _blocks_agree(sz, target)
    prompt = _prompt(sz)
    ar = FastPipeline([target]).generate(prompt, sz.new_tokens, ignore_eos=True).token_ids
    for s in (draft, target):
        s.use_captured_steps()  # every bucket captured now, as PIPESPEC_GRAPHS=1 does
    pipe, gen = FastPipeline([draft, target], adaptive_windows=False), {}
    for mode in ("sync", "pipespec"):
        r = pipe.generate(prompt, sz.new_tokens, ignore_eos=True, mode=mode)
        gen[mode] = {"first_difference_from_ar": _first_difference(r.token_ids, ar),
                     "accepted": r.stage_stats[-1].accepted}
    pipe.close()
    gen["replays"] = {"draft": draft.steps.replays, "target": target.steps.replays}
    ok = res["exact"] and all(g["first_difference_from_ar"] is None
                              for m, g in gen.items() if m != "replays")
    return {"ok": ok and target.steps.replays > 0, "dtype": str(dtype).removeprefix("torch."),
            **res, "generation": gen}


def bench_forward_graphs(sz: Sizes, dtype: torch.dtype, target) -> dict:
    """One target forward of n = 1 and n = 9 after ``FORWARD_CONTEXT`` cached tokens, eager
    and as a captured step (bucket 1 and 16), interleaved per n: device time, host enqueue
    time, and the enqueue's share of the device time (issue 13's goal: < 5%)."""
    model, cache = target.model, target.cache
    ctx = FORWARD_CONTEXT[sz.device]
    steps = StaticSteps(model, cache)
    out = {"captured": steps.capture}
    for n in (1, 9):
        toks = torch.arange(n, device=sz.device)

        def eager(toks=toks):
            cache.length = ctx
            model(toks, cache)

        def graph(toks=toks):
            cache.length = ctx
            steps.forward(toks)

        graph()  # captures the bucket (CUDA) before anything is timed
        sync(sz.device)
        row = {}
        for name, fn in (("eager", eager), ("graphs", graph)):
            row[name] = {**time_ms(fn, sz.device, sz.iters),
                         **host_and_device_ms(fn, sz.device, sz.iters)}
        g, e = row["graphs"], row["eager"]
        row["graphs_speedup"] = round(e["median_ms"] / g["median_ms"], 3)
        row["graphs_host_share"] = round(g["host_enqueue_median_ms"] / g["median_ms"], 4)
        out[f"n{n}"] = row
    cache.length = 0
    return out

