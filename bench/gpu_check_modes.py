"""The modes benchmark of ``gpu_check.py``: tokens/s of ar, sync and pipespec with a
SmolLM2-135M-shaped draft and a Llama-3-8B-shaped target, random weights, at set acceptance
rates (issue 13's goal: pipespec faster than sync and ar at acceptance 0.7).

* The draft is an :class:`~oracle_draft.OracleDraft` over a real SmolLM2-shaped model (its
  forward is what a draft costs; the target's vocabulary, shared). Its acceptance rate is
  chosen, not learned: the oracle proposes the target's greedy token with probability ``a``,
  read from the ar run that is the baseline anyway.
* The target is *decisive*: every layer writes into the residual stream at a small scale, so
  the current token's embedding leads it, and the head holds the embeddings in a random order
  (scaled), so the greedy next token wins by a margin of about 15 logits against a spread of
  ``16 / sqrt(dim)``. Rounding that depends on the block size (cuBLAS in bf16: a verify block
  against ar's single tokens) cannot flip it, so every mode emits ar's tokens and the oracle's
  reference stays the target's sequence. Values do not change a forward's cost.
* On CUDA both model stages run captured steps (CUDA graphs: the path the goal is about; the
  eager one is host-bound, issue 13); if capture fails the runs go on eagerly, the error
  recorded under ``graphs``.

Each run is a correctness check too: sync and pipespec must emit ar's tokens.
"""

from __future__ import annotations

import time

import torch
from gpu_check_common import Section, Sizes, sync
from gpu_check_models import _first_difference, _init_target, _prompt, config
from oracle_draft import OracleDraft, is_right

from pipespec_fast import FastPipeline, LlamaStage, NGramStage
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.llama import Transformer

LOOKAHEAD = 80  # cache slots past the last generated token (drafts run ahead of it)
HEAD_LOGIT = 16.0  # the decisive target's greedy logit, about
SEED = 5  # the oracle's hash


def draft_config(sz: Sizes) -> LlamaConfig:
    return LlamaConfig(vocab_size=sz.model["vocab_size"], rms_norm_eps=1e-5,
                       max_position_embeddings=8192, eos_token_ids=[], **sz.bench_draft)


@torch.no_grad()
def decisive_target(sz: Sizes, gen: torch.Generator) -> Transformer:
    """An 8B-shaped target (``sz.bench_target_layers`` layers) whose greedy token has a wide
    margin (module doc): ``next = perm^-1(current)``, nudged by nothing rounding can reach."""
    m = Transformer(config(sz, sz.bench_target_layers))
    _init_target(m, 0, gen)  # every layer's output projections scaled by DEEP_SCALE
    emb = m.tok_embeddings.weight
    perm = torch.randperm(emb.shape[0], generator=gen, device=emb.device)
    m.output.weight.copy_(emb[perm] * (HEAD_LOGIT / m.config.dim))
    return m


def build(sz: Sizes, dtype: torch.dtype, seed: int = 11) -> tuple[LlamaStage, LlamaStage, object]:
    """(draft model stage, target stage, graphs: True, False off CUDA, or the capture error)."""
    gen = torch.Generator(device=sz.device).manual_seed(seed)
    max_len = sz.prompt + sz.bench_new_tokens + LOOKAHEAD
    with torch.device(sz.device):
        target = decisive_target(sz, gen)
        draft = Transformer(draft_config(sz))
        _init_target(draft, draft.config.n_layers, gen)
    stages = []
    for name, m in (("smollm2-shaped", draft), ("8b-shaped", target)):
        m = m.to(dtype).eval()
        m.use_fused = False  # CPU dry run: the torch layers and the Triton kernels, as on CUDA
        stages.append(LlamaStage(m, name=name, max_len=max_len))
    graphs: object = False
    if sz.cuda:
        try:
            for s in stages:
                if s.steps is None:  # (PIPESPEC_GRAPHS=1 has captured them at construction)
                    s.use_captured_steps()  # every bucket captured now, as that flag does
            graphs = True
        except Exception as exc:  # recorded; the benchmark runs eagerly
            for s in stages:
                s.steps = None
            graphs = f"{type(exc).__name__}: {exc}"[:500]
    return stages[0], stages[1], graphs


def greedy_margin(model: Transformer, tokens: list[int]) -> float:
    """The smallest gap between the first and second logit over the positions of ``tokens``
    (one prefill on a cache of its own): what rounding would have to overcome to flip a greedy
    token of the decisive target."""
    cache = model.new_cache(len(tokens))
    top2 = model(torch.tensor(tokens, device=cache.k.device), cache).topk(2, dim=-1).values
    return round(float((top2[:, 0] - top2[:, 1]).min()), 3)


def _params(stage: LlamaStage) -> int:
    return sum(p.numel() for p in stage.model.parameters())


class ModesBench:
    """One draft/target pair, its prompt and ar's tokens on it; :meth:`run` times the modes
    with an oracle of a given acceptance over that pair."""

    def __init__(self, sz: Sizes, dtype: torch.dtype) -> None:
        self.sz, self.dtype = sz, dtype
        self.draft, self.target, self.graphs = build(sz, dtype)
        self.prompt = _prompt(sz)
        ar = FastPipeline([self.target])
        ar.generate(self.prompt, 4, ignore_eos=True, mode="ar")  # warm-up
        self.baseline = self._timed(ar, "ar")
        ar.close()
        self.ar_tokens = self.baseline.pop("tokens")
        self.reference = self.prompt + self.ar_tokens

    def describe(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "graphs": self.graphs,
                "new_tokens": self.sz.bench_new_tokens, "prompt": self.sz.prompt,
                "draft": {**self.sz.bench_draft, "params": _params(self.draft)},
                "target": {"n_layers": self.sz.bench_target_layers, **self.sz.model,
                           "params": _params(self.target)},
                "target_greedy_margin_min": greedy_margin(self.target.model, self.reference),
                "ar": self.baseline}

    def _timed(self, pipe: FastPipeline, mode: str) -> dict:
        sync(self.sz.device)
        t0 = time.perf_counter()
        res = pipe.generate(self.prompt, self.sz.bench_new_tokens, ignore_eos=True, mode=mode)
        wall = time.perf_counter() - t0
        st = res.stage_stats[-1]
        return {"tokens": res.token_ids, "wall_s": round(wall, 4),
                "tokens_per_s": round(len(res.token_ids) / wall, 2), "proposed": st.proposed,
                "accepted": st.accepted, "alpha": round(st.alpha, 3),
                "acceptance_rate": round(st.acceptance_rate, 3)}

    def oracle_share(self, acceptance: float) -> float:
        """The share of the generated positions where the oracle proposes the right token:
        the acceptance the target should measure."""
        span = range(len(self.prompt), len(self.reference))
        return round(sum(is_right(p, acceptance, SEED) for p in span) / len(span), 3)

    def run(self, acceptance: float, ngram: bool = False) -> dict:
        """ar, sync and pipespec interleaved on one pipeline ([n-gram ->] oracle -> target)
        with the defaults (adaptive windows, regimes: what a user gets), then sync and
        pipespec with fixed windows (``_fixed``: every step drafts, so the pair's speed at this
        acceptance shows even where the adaptive engine would stop drafting). Per mode:
        tokens/s and the target's measured acceptance (``alpha``: accepted / (accepted +
        rejections)); ``ok``: every mode emitted ar's tokens and drafts were checked."""
        draft = OracleDraft(self.draft, self.reference, acceptance, seed=SEED)
        stages = [draft, self.target]
        if ngram:  # the default hierarchy's shape; the n-gram stage on the CPU, as loading does
            stages.insert(0, NGramStage(self.target.vocab_size, max_len=self.target.max_len))
        out = {"acceptance_set": acceptance, "oracle_right_share": self.oracle_share(acceptance),
               "stages": [s.name for s in stages]}
        for adaptive, suffix in ((True, ""), (False, "_fixed")):
            pipe = FastPipeline(stages, adaptive_windows=adaptive)
            for mode in ("sync", "pipespec"):
                pipe.generate(self.prompt, 8, ignore_eos=True, mode=mode)  # warm-up
            for mode in ("ar", "sync", "pipespec") if adaptive else ("sync", "pipespec"):
                r = out[mode + suffix] = self._timed(pipe, mode)
                r["first_difference_from_ar"] = _first_difference(r.pop("tokens"),
                                                                  self.ar_tokens)
            pipe.close()
        out["measured_acceptance"] = out["sync_fixed"]["alpha"]
        tps = {m: r["tokens_per_s"] for m, r in out.items() if isinstance(r, dict)}
        for a, b in (("pipespec", "ar"), ("pipespec", "sync"), ("pipespec_fixed", "ar"),
                     ("pipespec_fixed", "sync_fixed")):
            out[f"{a}_over_{b}"] = round(tps[a] / tps[b], 3)
        runs = [r for r in out.values() if isinstance(r, dict)]
        same = all(r["first_difference_from_ar"] is None for r in runs)
        return {"ok": same and out["sync_fixed"]["proposed"] > 0, **out}


def modes_benchmarks(sec: Section, sz: Sizes, dtype: torch.dtype) -> None:
    """The pair and ar first, then one check per acceptance (the goal's first), then the
    n-gram hierarchy at the first acceptance; the section's budget cuts the tail."""
    name = f"modes/{str(dtype).removeprefix('torch.')}"
    held: dict = {}

    def setup() -> dict:
        held["bench"] = ModesBench(sz, dtype)
        return held["bench"].describe()

    sec.run(f"{name}/setup_and_ar", "benchmark", setup)
    bench = held.get("bench")
    if bench is None:
        return
    for a in sz.acceptances:
        sec.run(f"{name}/oracle_a{a}", "correctness", bench.run, a)
    sec.run(f"{name}/ngram_oracle_a{sz.acceptances[0]}", "correctness", bench.run,
            sz.acceptances[0], ngram=True)
