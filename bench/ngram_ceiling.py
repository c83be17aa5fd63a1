"""How fast any window rule could make the default `[n-gram -> target]` on the benchmarks'
prompts: the ceiling its drafts allow, given the target's verify latencies on this machine.

Teacher-forced: our AR's greedy answers to the ``bench/e2e.py`` prompts (chat template,
``--max-new-tokens`` each), and at every position of an answer the chain of ``--window``
drafts the default n-gram drafter (with its store) proposes after the text so far, each draft
right or wrong. With ``L(n)``, the target's forward of ``n`` tokens probed alone on the
machine (``e2e.probe_latency``, ``n = 1 .. window + 1``) and fitted with a line (what the
engine's window rule fits too; the probe's single sizes move by 10% on a noisy VM), plus
``o``, what an AR step of these very runs cost beyond ``L(1)`` (its host work, a longer
context than the probe's), charged to every step, decoding an answer costs:

* with a fixed window ``g`` (``0``: AR): ``L(g + 1) + o`` per step, ``1 + accepted`` tokens
  each;
* with a *perfect* window: the fastest sequence of windows for this answer, knowing every
  outcome beforehand (a shortest path over its positions: from each, a window of ``g`` drafts
  costs ``L(g + 1) + o`` and moves on past the accepted ones and the target's token): no
  window rule over these chains (up to ``--window`` drafts) commits this answer faster.

Printed per task: decode tokens/s of each as a ratio to AR's decode, and end to end, with
the target's measured prefill of each prompt added to both (what the benchmark's ratios
include). A verify step is charged no more besides its forward than an AR step (in the
engine it costs more: its acceptance, its messages), so for the probed ``L(n)`` each figure
is an upper bound for its rule; ``L(n)`` itself moves with the VM's state from run to run.

    .venv/bin/python bench/ngram_ceiling.py [--prompts 12] [--max-new-tokens 96] [--window 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench scripts import each other

Chain = list[bool]  # drafts right (True) or wrong, in order
Rule = Callable[[Chain], int]  # a step's window from its chain


def teacher_forced_chains(drafter, prompt: Sequence[int], answer: Sequence[int],
                          depth: int) -> list[Chain]:
    """For each position ``p`` of ``answer``: is each of the ``depth`` drafts the drafter
    proposes after ``prompt + answer[:p]`` (each after the ones before it) ``answer[p + j]``?
    ``drafter``: a fresh ``NGramStage`` (its history is used and left behind)."""
    nxt = drafter.propose(list(prompt))
    out = []
    for p in range(len(answer)):
        base = drafter.cache_len
        chain, tok = [], nxt
        for j in range(depth):
            chain.append(p + j < len(answer) and tok == answer[p + j])
            if j + 1 < depth:
                tok = drafter.propose([tok])
        drafter.rollback(base)
        out.append(chain)
        nxt = drafter.propose([answer[p]])
    return out


def accepted(chain: Chain, g: int) -> int:
    """Drafts a window of ``g`` accepts: its leading run of right ones."""
    k = 0
    while k < g and k < len(chain) and chain[k]:
        k += 1
    return k


def decode_seconds(chains: list[Chain], latency: Callable[[int], float], rule: Rule) -> float:
    """Seconds to decode the answer whose chains these are, one verify of ``rule(chain)``
    drafts per step, ``1 + accepted`` tokens committed by each."""
    seconds, p = 0.0, 0
    while p < len(chains):
        g = rule(chains[p])
        seconds += latency(g + 1)
        p += accepted(chains[p], g) + 1
    return seconds


def fixed(g: int) -> Rule:
    return lambda chain: g


def perfect_seconds(chains: list[Chain], latency: Callable[[int], float]) -> float:
    """The least time any choice of windows decodes the answer in, each outcome known: from
    position ``p`` a window of ``g`` drafts costs ``L(g + 1)`` and reaches ``p + 1 +
    accepted``; a window past the accepted run costs more for the same step, so ``g`` goes
    up to it (a shortest path, solved backwards)."""
    n = len(chains)
    best = [0.0] * (n + 1)
    for p in range(n - 1, -1, -1):
        k = accepted(chains[p], len(chains[p]))
        best[p] = min(latency(g + 1) + best[min(n, p + g + 1)] for g in range(k + 1))
    return best[0]


def ratios(chains: list[list[Chain]], prefill_s: list[float], latency: Callable[[int], float],
           rules: dict[str, Rule]) -> dict[str, tuple[float, float]]:
    """Per rule, and for the perfect window (``"perfect window"``), ``(decode, end to end)``
    speed as ratios to AR's over all the answers."""
    ar = sum(len(c) * latency(1) for c in chains)
    pre = sum(prefill_s)
    times = {name: sum(decode_seconds(c, latency, rule) for c in chains)
             for name, rule in rules.items()}
    times["perfect window"] = sum(perfect_seconds(c, latency) for c in chains)
    return {name: (ar / t, (pre + ar) / (pre + t)) for name, t in times.items()}


def _answers(pipe, prompts, max_new: int) -> tuple[list[list[int]], list[float], float]:
    """Our AR's greedy answers (``e2e.py``'s own ``ours_ar`` system), each one's prefill
    seconds, and the seconds per decoded token over all of them (the rest of each run)."""
    import e2e

    ar = e2e.OursSystem(pipe, "ar")
    ar.run(prompts[0][:32], 4, 0.0, 0)  # warm-up, as e2e.py does
    runs = [ar.run(ids, max_new, 0.0, 0) for ids in prompts]
    decode_s = sum(r["tokens"] / r["decode_tokens_per_s"] for r in runs)
    return ([r["ids"] for r in runs], [r.get("prefill_s", 0.0) for r in runs],
            decode_s / sum(r["tokens"] for r in runs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--window", type=int, default=6, help="the longest chain (the default's)")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1 or args.window < 1:
        ap.error("--prompts, --max-new-tokens and --window must be >= 1")

    import e2e

    from pipespec_fast import FastPipeline
    from pipespec_fast.analysis import weighted_line

    pipe = FastPipeline.from_default(draft=False)
    drafter = pipe.stages[0]
    ns = tuple(range(1, args.window + 2))
    lat_ms = e2e.probe_latency(pipe, ns=ns)["target"]
    a, b = weighted_line(ns, [lat_ms[n] / 1e3 for n in ns], [1.0] * len(ns))
    print("L(n), ms, probed: " + ", ".join(f"{n}: {lat_ms[n]:.2f}" for n in ns)
          + f"; fitted: {1e3 * a:.2f} + {1e3 * b:.2f} n")
    rules = {f"window {g}": fixed(g) for g in range(1, args.window + 1)}
    print("| task | rule | decode vs AR | end to end vs AR |\n|---|---|---|---|")
    for task in ("humaneval", "mtbench"):
        prompts = [pipe.chat_prompt(p) for p in e2e.load_prompts(task, args.prompts)]
        t = time.perf_counter()
        answers, prefill, ar_step = _answers(pipe, prompts, args.max_new_tokens)
        o = max(0.0, ar_step - (a + b))  # an AR step beyond the line's L(1)

        def latency(n: int, o=o) -> float:
            return a + b * n + o

        chains = [teacher_forced_chains(drafter.clone(), p, x, args.window)
                  for p, x in zip(prompts, answers, strict=True)]
        for name, (dec, e2e_ratio) in ratios(chains, prefill, latency, rules).items():
            print(f"| {task} | {name} | {dec:.2f}x | {e2e_ratio:.2f}x |")
        print(f"| {task} | (prefill: median {1e3 * statistics.median(prefill):.0f} ms; AR step "
              f"{1e3 * ar_step:.2f} ms, o = {1e3 * o:.2f} ms; {time.perf_counter() - t:.0f} s)"
              " | | |")
    pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
