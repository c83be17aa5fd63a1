"""Pictures for the README: speedup by system and task (from ``bench/e2e.py``'s JSON), and the
time line of each stage's busy intervals during one PipeSpec generation.

    .venv/bin/python bench/plots.py            # reads bench/results/e2e-*.json, writes PNGs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def speedup_chart(out: Path) -> Path | None:
    """Horizontal bars: each system's whole-run tokens/s over our AR's in the same run
    (``bench/ratios.py``; older results: the medians'), one bar per task and temperature (a
    system a run did not measure has no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.glob("e2e-*.json"))
    if not files:
        return None
    data = [json.loads(f.read_text()) for f in files]
    systems = [s for s in dict.fromkeys(s for d in data for s in d["summary"]) if s != "ours_ar"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(systems) + 1.5))
    height = 0.8 / len(data)
    for j, d in enumerate(data):
        m, summ = d["meta"], d["summary"]
        ar = summ.get("ours_ar", {}).get("median_tokens_per_s")
        pts = [(i, summ[s]["vs_ours_ar"][0] if "vs_ours_ar" in summ[s]
                else summ[s]["median_tokens_per_s"] / ar) for i, s in enumerate(systems)
               if ar and s in summ]
        if not pts:
            continue
        bars = ax.barh([i + j * height for i, _ in pts], [r for _, r in pts], height,
                       label=f"{m['task']} T={m['temperature']:g}"
                             + ("" if m.get("seeded", True) else " unseeded"))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks([i + height * (len(data) - 1) / 2 for i in range(len(systems))], systems,
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s relative to our AR (target alone) in the same run")
    compute = (data[0]["meta"].get("compute") or [None])[-1] or "default"
    ax.set_title(f"Decoding speed, SmolLM2-135M-Instruct ({compute} compute), 2-core CPU",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


COLORS = {"prefill": "#999999", "draft": "#4c9be8", "verify": "#e8734c",
          "tree": "#8e3bb5"}
LABELS = {"tree": "verify (tree)"}


def _timeline_panel(ax, res, title: str) -> None:
    """One generation's stages as rows of busy intervals, coloured by kind of forward."""
    for row, st in enumerate(res.stage_stats):
        for kind, color in COLORS.items():
            spans = [(a * 1e3, (b - a) * 1e3) for a, b, k in st.timeline if k == kind]
            if spans:
                ax.broken_barh(spans, (row - 0.35, 0.7), color=color,
                               label=LABELS.get(kind, kind))
    ax.set_yticks(range(len(res.stage_stats)),
                  [f"{i}: {s.name[:24]}" for i, s in enumerate(res.stage_stats)])
    ax.invert_yaxis()
    trees = res.stage_stats[-1].tree_steps
    ax.set_title(f"{title}: {res.stats['new_tokens']} tokens, "
                 f"{res.stats['tokens_per_s']:.1f} tokens/s"
                 + (f", {trees} tree verif{'y' if trees == 1 else 'ies'} by the target"
                    if trees else ""), fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=7)


def timeline_chart(out: Path, max_new_tokens: int = 64) -> Path:
    """The 3-level hierarchy ``[n-gram -> draft -> target]`` (the default on a GPU or 4+
    cores) with chains, then with n-gram token trees, on one HumanEval prompt: which stage
    runs what, when."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.e2e import load_prompts
    from pipespec_fast import FastPipeline

    pipe = FastPipeline.from_default(draft=True)
    ids = pipe.chat_prompt(load_prompts("humaneval", 1)[0])
    trees = FastPipeline(pipe.stages, tokenizer=pipe.tokenizer, tree_budget=16)
    runs = []
    for p, title in ((pipe, "[n-gram -> draft -> target], chains"),
                     (trees, "the same with n-gram trees (tree_budget=16)")):
        p.generate(ids, 8, ignore_eos=True)  # warm-up
        runs.append((p.generate(ids, max_new_tokens, ignore_eos=True), title))
    rows = sum(len(r.stage_stats) for r, _ in runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.55 * rows), sharex=True)
    for ax, (res, title) in zip(axes, runs, strict=True):
        _timeline_panel(ax, res, title)
    axes[-1].set_xlabel("ms since the start of generate()")
    fig.suptitle("PipeSpec stages at work", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    trees.close()
    pipe.close()
    return out


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for p in (speedup_chart(RESULTS / "speedup.png"), timeline_chart(RESULTS / "timeline.png")):
        if p:
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
