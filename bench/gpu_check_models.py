"""The model parts of ``gpu_check.py``: random-weight LLaMA models of realistic shapes built on
the device, greedy equality of pipespec / sync / ar, forward time (device and host enqueue);
tokens/s per mode is ``gpu_check_modes.py`` (a SmolLM2-shaped oracle draft).

For the correctness checks the target has Llama-3-8B's width, heads and vocabulary but few
layers; the draft is a noisy copy of the target's embedding, head and first layer(s). The
target's deeper layers write into the residual stream at a small scale (``DEEP_SCALE``), so the
target is close to its first layers and the draft's noise sets the acceptance rate: real drafts
that agree often, without a checkpoint or a download.
"""

from __future__ import annotations

import time

import torch
from gpu_check_common import Section, Sizes, host_and_device_ms, time_ms

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.llama import Transformer

DEEP_SCALE = 0.05  # output projections of the target's layers the draft does not copy
# Relative noise of the draft's weights. Greedy agreement of draft and target, teacher-forced
# on 96 random tokens at width 1024 (vocab 128256, 4 target layers; the init is scaled by
# fan-in, so width matters little), measured on CPU: noise 0.25 -> 0.23, 0.15 -> 0.50,
# 0.1 -> 0.62, 0.07 -> 0.74, 0.05 -> 0.77. 0.07 aims at the acceptance 0.7; the JSON
# records the acceptance each run measured.
DRAFT_NOISE = 0.07
FORWARD_CONTEXT = {"cuda": 4096, "cpu": 32}


def config(sz: Sizes, n_layers: int) -> LlamaConfig:
    return LlamaConfig(n_layers=n_layers, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False,
                       eos_token_ids=[], **sz.model)


@torch.no_grad()
def _init_target(m: Transformer, draft_layers: int, gen: torch.Generator) -> None:
    """Weights scaled so activations stay O(1) in any dtype; logits spread enough that greedy
    near-ties are rare."""
    dim = m.config.dim
    for name, p in m.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=p.device))
            continue
        std = 1.0 if "tok_embeddings" in name else p.shape[1] ** -0.5
        if name.startswith("output"):
            std = 4.0 * dim**-0.5
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        if layer >= draft_layers and (".wo." in name or ".w2." in name):
            std *= DEEP_SCALE
        p.copy_(std * torch.randn(p.shape, generator=gen, device=p.device))


@torch.no_grad()
def _noisy_draft(target: Transformer, cfg: LlamaConfig, gen: torch.Generator) -> Transformer:
    draft = Transformer(cfg)
    src = dict(target.named_parameters())
    for name, p in draft.named_parameters():
        t = src[name]
        p.copy_(t + DRAFT_NOISE * t.std() * torch.randn(t.shape, generator=gen,
                                                        device=t.device))
    return draft


def build_pair(sz: Sizes, dtype: torch.dtype, seed: int = 0) -> tuple[LlamaStage, LlamaStage]:
    """(draft, target) stages on the check's device, in ``dtype``."""
    gen = torch.Generator(device=sz.device).manual_seed(seed)
    max_len = max(sz.prompt + sz.new_tokens + 80, FORWARD_CONTEXT[sz.device] + 80)
    with torch.device(sz.device):
        target = Transformer(config(sz, sz.target_layers))
        _init_target(target, sz.draft_layers, gen)
        draft = _noisy_draft(target, config(sz, sz.draft_layers), gen)
    stages = []
    for name, m in (("draft", draft), ("target", target)):
        m = m.to(dtype).eval()
        m.use_fused = False  # CPU dry run: the torch layers and the Triton kernels, as on CUDA
        stages.append(LlamaStage(m, name=name, max_len=max_len))
    return stages[0], stages[1]


def _prompt(sz: Sizes) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, sz.model["vocab_size"], (sz.prompt,), generator=g).tolist()


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def run_modes(sz: Sizes, dtype: torch.dtype, seed: int, adaptive: bool) -> dict:
    """Greedy generations in ar, sync and pipespec modes of one draft/target pair: tokens/s,
    acceptance, and where each differs from ar (``None``: identical). ``adaptive=False``:
    fixed windows, so every step verifies drafts (the equality check's coverage)."""
    draft, target = build_pair(sz, dtype, seed)
    pipe = FastPipeline([draft, target], adaptive_windows=adaptive)
    prompt, out = _prompt(sz), {}
    pipe.generate(prompt, 4, ignore_eos=True, mode="sync")  # warm-up: compiles the kernels
    for mode in ("ar", "sync", "pipespec"):
        if sz.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = pipe.generate(prompt, sz.new_tokens, ignore_eos=True, mode=mode)
        wall = time.perf_counter() - t0
        st = res.stage_stats[-1]
        out[mode] = {"tokens": res.token_ids, "wall_s": round(wall, 4),
                     "tokens_per_s": round(len(res.token_ids) / wall, 2),
                     "proposed": st.proposed, "accepted": st.accepted,
                     "acceptance": round(st.accepted / st.proposed, 3) if st.proposed else None}
    ar = out["ar"]["tokens"]
    for mode in ("sync", "pipespec"):
        out[mode]["first_difference_from_ar"] = _first_difference(out[mode]["tokens"], ar)
    pipe.close()
    return out


def check_greedy_equality(sz: Sizes, dtype: torch.dtype) -> dict:
    """pipespec and sync emit exactly ar's tokens (fp32: a near-tie within cuBLAS's batch-size
    dependent rounding could break it in principle; docs/BENCHMARKS.md)."""
    res = run_modes(sz, dtype, 0, adaptive=False)
    same = all(res[m]["first_difference_from_ar"] is None for m in ("sync", "pipespec"))
    accepted = sum(res[m]["accepted"] for m in ("sync", "pipespec"))
    return {"ok": same and accepted > 0, "dtype": str(dtype).removeprefix("torch."),
            "new_tokens": sz.new_tokens, **_summary(res)}


def check_ngram_and_sampling(sz: Sizes, dtype: torch.dtype) -> dict:
    """The default hierarchy's shape, [n-gram (CPU) -> draft -> target (device)]: greedy
    sync and pipespec equal the target alone (the n-gram stage's proposals cross devices), and
    sampled runs (T = 0.8, top-p 0.9: rows kept and moved between stages) complete."""
    from pipespec_fast import NGramStage

    draft, target = build_pair(sz, dtype, 3)
    ngram = NGramStage(target.vocab_size, max_len=target.max_len)  # the CPU, as loading does
    prompt = (_prompt(sz)[:8] * sz.prompt)[:sz.prompt]  # repeats: the n-gram stage finds some
    ar = FastPipeline([target]).generate(prompt, sz.new_tokens, ignore_eos=True).token_ids
    pipe, out = FastPipeline([ngram, draft, target], adaptive_windows=False), {}
    for mode in ("sync", "pipespec"):
        res = pipe.generate(prompt, sz.new_tokens, ignore_eos=True, mode=mode)
        out[mode] = {"first_difference_from_ar": _first_difference(res.token_ids, ar),
                     "proposed_per_stage": [st.proposed for st in res.stage_stats],
                     "accepted_per_stage": [st.accepted for st in res.stage_stats]}
        res = pipe.generate(prompt, sz.new_tokens, ignore_eos=True, mode=mode,
                            temperature=0.8, top_p=0.9, seed=3)
        out[mode]["sampled_tokens"] = len(res.token_ids)
    pipe.close()
    ok = all(r["first_difference_from_ar"] is None and r["sampled_tokens"] == sz.new_tokens
             for r in out.values())
    return {"ok": ok, "dtype": str(dtype).removeprefix("torch."), "ngram_device": "cpu", **out}


def _summary(res: dict) -> dict:
    return {m: {k: v for k, v in r.items() if k != "tokens"} for m, r in res.items()}


def bench_forward(sz: Sizes, dtype: torch.dtype) -> dict:
    """One target forward of n = 1 and n = 9 new tokens after ``FORWARD_CONTEXT`` cached ones
    (contents random): device time, and host enqueue time of the same call (eager); under
    ``graphs``, the same with and without captured steps (``gpu_check_graphs.py``)."""
    from gpu_check_graphs import bench_forward_graphs

    _, target = build_pair(sz, dtype, 2)
    cache, model = target.cache, target.model
    ctx = FORWARD_CONTEXT[sz.device]
    out = {"context": ctx, "dtype": str(dtype).removeprefix("torch."),
           "layers": sz.target_layers}
    for n in (1, 9):
        toks = torch.arange(n, device=sz.device)

        def step(toks=toks):
            cache.length = ctx
            model(toks, cache)

        out[f"n{n}"] = {**time_ms(step, sz.device, sz.iters),
                        **host_and_device_ms(step, sz.device, sz.iters)}
    try:  # recorded apart, so that the eager figures above survive a failed capture
        out["graphs"] = bench_forward_graphs(sz, dtype, target)
    except Exception as exc:
        out["graphs"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    return out


def model_checks(sec: Section, sz: Sizes) -> None:
    from gpu_check_graphs import check_captured_steps
    from gpu_check_syncs import check_host_syncs

    sec.run("greedy_equality/float32", "correctness", check_greedy_equality, sz, torch.float32)
    # second: budgets are checked between checks, and the first GPU run must not skip this one
    sec.run("host_syncs/float32", "correctness", check_host_syncs, sz, torch.float32)
    sec.run("ngram_draft_target/float32", "correctness", check_ngram_and_sampling, sz,
            torch.float32)
    sec.run("captured_steps/float32", "correctness", check_captured_steps, sz, torch.float32)


def model_benchmarks(sec: Section, sz: Sizes) -> None:
    dt = torch.bfloat16 if sz.cuda else torch.float32
    sec.run(f"forward/{str(dt).removeprefix('torch.')}", "benchmark", bench_forward, sz, dt)
    from gpu_check_modes import modes_benchmarks

    modes_benchmarks(sec, sz, dt)
