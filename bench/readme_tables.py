"""The README's benchmark tables from ``bench/e2e.py``'s JSON results (all tasks in one table).

    .venv/bin/python bench/readme_tables.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("humaneval-t0", "humaneval-t0.7", "mtbench-t0", "mtbench-t0.7")
# each family's first system: the greedy output its others are compared with
REFERENCES = ("hf_ar", "ours_ar", "llamacpp_ar")


def _pct(xs) -> str:
    return ", ".join(f"{x:.0%}" for x in xs) if xs else "-"


KINDS = ("prefill", "draft", "verify", "wait", "other")


def _draft_ms(lat: dict) -> str:
    """The draft's step alone, and its steps after a target forward where probed."""
    alone = next(iter(lat.get("draft", {}).values()), 0.0)
    after = lat.get("draft_after_verify")
    steps = f" ({', '.join(f'{v:.2f}' for v in after.values())})" if after else ""
    return f"{alone:.2f}{steps}"


def ceiling_table(runs: list[dict], greedy_only: bool = True) -> list[str]:
    """Markdown rows: the speculation ceiling per task and system (``summary[name]['ceiling']``,
    from ``bench/e2e.py``), beside the measured ratio to our sync."""
    lines = ["| task | T | target ms, n = 1, 2, 3, 4, 5, 7 | draft ms alone (steps 1-4 after a "
             "verify) | system | alpha | best sync tokens/s (window) | free, ready drafts "
             "(window) | bound vs best sync | measured vs ours_sync |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, summ = r["meta"], r["summary"]
        if (greedy_only and m["temperature"] != 0) or "latency_ms" not in m:
            continue
        lat = m["latency_ms"]
        tgt = ", ".join(f"{v:.1f}" for v in lat["target"].values())
        sync = run_or_median(summ["ours_sync"]) if "ours_sync" in summ else None
        for name, d in summ.items():
            c = d.get("ceiling")
            if not c:
                continue
            vs = f"{run_or_median(d) / sync:.2f}x" if sync else "-"
            lines.append(f"| {m['task']} | {m['temperature']:g} | {tgt} | {_draft_ms(lat)} | "
                         f"{name} | {c['alpha']:.2f} | {c['sync_tokens_per_s']:.0f} "
                         f"({c['sync_gamma']}) | {c['free_draft_tokens_per_s']:.0f} "
                         f"({c['free_draft_gamma']}) | {c['free_draft_vs_sync']:.2f}x | {vs} |")
    return lines


def needed_table(runs: list[dict], greedy_only: bool = True) -> list[str]:
    """Markdown rows: per task, the per-token acceptance each goal speedup over AR needs
    (``meta['alpha_needed']``: with the model draft's probed steps, and with free, ready
    drafts), beside the acceptance measured for the model draft (``ours_sync``) and the n-gram
    drafter (``ours_pipespec_ngram``)."""
    lines = ["| task | T | speedup over AR | alpha needed: model draft, synchronous | alpha "
             "needed: free, ready drafts (any pipeline) | measured alpha: model draft | "
             "measured alpha: n-gram |", "|---|---|---|---|---|---|---|"]

    def fmt(a) -> str:
        return "unreachable" if a is None else f"{a:.2f}"

    for r in runs:
        m, summ = r["meta"], r["summary"]
        if (greedy_only and m["temperature"] != 0) or "alpha_needed" not in m:
            continue
        meas = [summ.get(n, {}).get("ceiling", {}).get("alpha")
                for n in ("ours_sync", "ours_pipespec_ngram")]
        meas = [f"{a:.2f}" if a is not None else "-" for a in meas]
        for s, need in m["alpha_needed"].items():
            lines.append(f"| {m['task']} | {m['temperature']:g} | {s}x | "
                         f"{fmt(need['sync']) if 'sync' in need else '-'} | "
                         f"{fmt(need['free'])} | {meas[0]} | {meas[1]} |")
    return lines


def rates_table(runs: list[dict], greedy_only: bool = True) -> list[str]:
    """Markdown rows: prefill and decode rates of the systems that report them (ours: the
    target's prefill and the decoding after it; llama.cpp: its tools' own counters), end to
    end tokens/s, and llama.cpp's greedy agreement with our output."""
    lines = ["| task | T | system | prompt tokens | prefill tokens/s | decode tokens/s | end to "
             "end tokens/s | greedy = ours: prompts (tokens) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, summ = r["meta"], r["summary"]
        if greedy_only and m["temperature"] != 0:
            continue
        for name, d in summ.items():
            if "median_prefill_tokens_per_s" not in d:
                continue
            same = "-"
            if "agreement_with_ours" in d:
                same = (f"{d['prompts_equal_to_ours']}/{d['runs']} "
                        f"({d['agreement_with_ours']:.0%})")
                if not d.get("prompt_tokens_match", True):
                    same += ", other prompt tokens"
            rss = f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else "-"
            if "threads" in d:
                n = "/".join(map(str, d["threads"]))
                name += f" ({n} thread{'' if n == '1' else 's'})"
            lines.append(f"| {m['task']} | {m['temperature']:g} | {name} | "
                         f"{d.get('median_prompt_tokens', 0):.0f} | "
                         f"{d['median_prefill_tokens_per_s']:.0f} | "
                         f"{d['median_decode_tokens_per_s']:.1f} | "
                         f"{d['median_tokens_per_s']:.1f} | {same} | {rss} |")
    return lines


def time_table(runs: list[dict], greedy_only: bool = True) -> list[str]:
    """Markdown rows: each model stage's share of the wall time by kind (``time_share``)."""
    lines = ["| task | T | system | stage | " + " | ".join(KINDS) + " |",
             "|---|---|---|---|" + "---|" * len(KINDS)]
    for r in runs:
        m, summ = r["meta"], r["summary"]
        if greedy_only and m["temperature"] != 0:
            continue
        for name, d in summ.items():
            shares = d.get("time_share", [])
            for i, share in enumerate(shares):
                if d.get("model_free", [False] * len(shares))[i]:
                    continue  # the n-gram stage runs inside the worker above it
                stage = "target" if i == len(shares) - 1 else "draft"
                lines.append(f"| {m['task']} | {m['temperature']:g} | {name} | {stage} | "
                             + " | ".join(f"{share.get(k, 0.0):.0%}" for k in KINDS) + " |")
    return lines


def depth_table(runs: list[dict], greedy_only: bool = False) -> list[str]:
    """Markdown rows: the target's acceptance per draft depth (pooled over prompts), and
    drafts (tree nodes) per verify, for every speculative system."""
    lines = ["| task | T | system | drafts per target step | tree verifies | target acceptance at "
             "depth 1, 2, 3, ... |", "|---|---|---|---:|---:|---|"]
    for r in runs:
        m, summ = r["meta"], r["summary"]
        if greedy_only and m["temperature"] != 0:
            continue
        for name, d in summ.items():
            depths = d.get("depth_acceptance")
            if not depths:
                continue
            lines.append(f"| {m['task']} | {m['temperature']:g} | {name} | "
                         f"{d['drafts_per_verify'][-1]:.1f} | {d['tree_share'][-1]:.0%} | "
                         + ", ".join(f"{a:.0%}" for a in depths[-1]) + " |")
    return lines


def run_or_median(d: dict) -> float:
    """A system's tokens/s: over the whole run (``bench/ratios.py``), or, in results written
    before it was recorded, the median over prompts."""
    return d.get("run_tokens_per_s", d["median_tokens_per_s"])


def vs_ours_ar(d: dict, summ: dict) -> str:
    """The ratio to our AR in the same run, with its 90% interval when recorded."""
    if "vs_ours_ar" in d:
        ratio, lo, hi = d["vs_ours_ar"]
        return f"{ratio:.2f}x [{lo:.2f}-{hi:.2f}]"
    ar = summ.get("ours_ar", {}).get("median_tokens_per_s")
    return f"{d['median_tokens_per_s'] / ar:.2f}x" if ar else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    runs = []
    for key in ORDER:
        path = Path(args.results) / f"e2e-{key}.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
    if not runs:
        names = ", ".join(f"e2e-{key}.json" for key in ORDER)
        raise SystemExit(f"none of {names} under {args.results}: run ./scripts/bench.sh first "
                         "(bench.sh's seeded runs; an --unseeded run's files are not tabled)")

    print("| task | T | system | tokens/s | vs hf_ar | vs ours_ar [90% interval] | acceptance "
          "| mean accepted length | predicted tokens/s | greedy = AR | target steps: full / "
          "lean / alone | MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        m, summ = r["meta"], r["summary"]
        for name, d in summ.items():
            tps = run_or_median(d)
            sp = f"{tps / run_or_median(summ['hf_ar']):.2f}x" if "hf_ar" in summ else "-"
            vs = vs_ours_ar(d, summ)
            mal = f"{d['mean_accepted_length']:.2f}" if "mean_accepted_length" in d else "-"
            pred = d.get("predicted_run_tokens_per_s", d.get("predicted_tokens_per_s"))
            pred = f"{pred:.1f} ({pred / tps - 1:+.0%})" if pred else "-"
            same = {True: "yes", False: "NO"}.get(d.get("identical_greedy_output"), "-")
            same = "ref" if name in REFERENCES and same == "yes" else same
            share = d.get("regime_share")
            regimes = " / ".join(f"{share.get(a, 0):.0%}" if a in share or a != "lean" else "-"
                                 for a in ("full", "lean", "alone")) if share else "-"
            print(f"| {m['task']} | {m['temperature']:g} | {name} | {tps:.1f} | {sp} | {vs} | "
                  f"{_pct(d.get('acceptance'))} | {mal} | {pred} | {same} | {regimes} | "
                  f"{d.get('memory_mb', 0):.0f} |")

    print("\nPrefill and decode rates (greedy; llama.cpp: its tools' own counters, its greedy "
          "output against ours up to our first end-of-text token)\n")
    print("\n".join(rates_table(runs)))
    print("\nSpeculation ceiling (greedy): the target's L(n) probed alone, the target's alpha "
          "in each system\n")
    print("\n".join(ceiling_table(runs)))
    print("\nThe per-token acceptance each speedup over AR needs (greedy; the ceiling above "
          "inverted: `analysis.alpha_needed`)\n")
    print("\n".join(needed_table(runs)))
    print("\nWhere each model stage spends a greedy run (share of wall time)\n")
    print("\n".join(time_table(runs)))
    print("\nThe target's acceptance per draft depth (pooled over the prompts; a tree tries "
          "one depth per level of the path it walks)\n")
    print("\n".join(depth_table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
