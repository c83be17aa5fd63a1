"""Resident memory of [n-gram -> draft -> target] after a generation (a measurement, not a test).

Loads ``FastPipeline.from_default(draft=True)`` (n-gram -> draft -> target; ``--no-draft``:
n-gram -> target), generates ``--tokens`` new tokens (greedy, EOS ignored, so every run
produces the same number) from a chat-templated prompt, and prints the process's resident set
(``VmRSS``, split into anonymous memory and mapped file pages such as torch's libraries) and
its peak (``VmHWM``) at each step, with the bytes each model holds in fp32 tensors and in
packed weight copies, and at the end the resident set by owner: what the imports took, the
weights, the KV cache slots written (the cache is allocated untouched: only written pages are
resident), and the rest (the tokenizer, torch kernels paged in on first use, threads, buffers).
Run it in a fresh process: RSS is per process, and anything loaded before counts.

    .venv/bin/python bench/memory.py [--tokens 512] [--no-draft] [--compute exact|int8]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def snapshot(label: str, rows: list[dict]) -> None:
    row = {"step": label, "rss_mb": status_kib("VmRSS") / 1024,
           "peak_mb": status_kib("VmHWM") / 1024, "anon_mb": status_kib("RssAnon") / 1024,
           "file_mb": status_kib("RssFile") / 1024}
    rows.append(row)
    print(f"{label:<28} RSS {row['rss_mb']:8.1f} MB   peak {row['peak_mb']:8.1f} MB   "
          f"(anon {row['anon_mb']:6.1f}, files {row['file_mb']:5.1f})", flush=True)


def kv_written_bytes(stage) -> int:
    """Bytes of the KV slots a stage's cache holds (``length`` slots of K and V in every layer
    and kv head), rounded up to whole 4 KiB pages per layer and head: what touching them made
    resident."""
    cache = getattr(stage, "cache", None)
    if cache is None:
        return 0
    layers, heads, _, hd = cache.k.shape
    per_run = cache.length * hd * cache.k.element_size()
    return 2 * layers * heads * (-(-per_run // 4096) * 4096)


def owners(rows: list[dict], models: dict, kv: int) -> dict[str, float]:
    """The final resident set split by owner (MB): library pages mapped since the imports
    (torch kernels run for the first time, the tokenizer's library) are counted apart from the
    anonymous rest (the tokenizer's tables, Python objects, threads, buffers)."""
    imports, final = rows[1], rows[-1]
    weights = sum(m["dense_mb"] + m["packed_mb"] for m in models.values())
    out = {"interpreter + imports": imports["rss_mb"], "model weights": weights,
           "KV slots written": kv / 2**20,
           "library pages since": final["file_mb"] - imports["file_mb"]}
    out["other anonymous"] = final["rss_mb"] - sum(out.values())
    return out


def model_bytes(model) -> tuple[int, int]:
    """(bytes of real fp32/other tensors, bytes of packed copies) held by a model; tensors on
    the meta device (weights held only in packed form) take no memory and are not counted."""
    dense = sum(t.numel() * t.element_size() for t in
                list(model.parameters()) + list(model.buffers()) if t.device.type != "meta")
    return dense, model.packed_bytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("--compute", default=None,
                    help="exact or int8 (default: FastPipeline.from_default's own choice)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    rows: list[dict] = []
    snapshot("start", rows)
    import torch  # noqa: F401  (counted on its own: the interpreter and torch's libraries)

    import pipespec_fast
    from pipespec_fast import FastPipeline

    snapshot("imports", rows)
    kw = {} if args.compute is None else {"compute": args.compute}
    pipe = FastPipeline.from_default(draft=not args.no_draft, **kw)
    snapshot("loaded", rows)
    models = {}
    for stage in pipe.stages:
        model = getattr(stage, "model", None)
        if model is not None:
            dense, packed = model_bytes(model)
            models[stage.name] = {"dense_mb": dense / 2**20, "packed_mb": packed / 2**20}
            print(f"  {stage.name}: {dense / 2**20:.1f} MB dense tensors, "
                  f"{packed / 2**20:.1f} MB packed", flush=True)
    prompt = pipe.chat_prompt("Write a Python function that checks whether a number is prime, "
                              "then explain how it works step by step.")
    t = time.perf_counter()
    res = pipe.generate(prompt, args.tokens, ignore_eos=True)
    dt = time.perf_counter() - t
    snapshot(f"after {len(res.token_ids)} tokens", rows)
    print(f"  {len(res.token_ids) / dt:.1f} tokens/s, {len(prompt)}-token prompt "
          f"(pipespec_fast {pipespec_fast.__file__})")
    split = owners(rows, models, sum(kv_written_bytes(s) for s in pipe.stages))
    for name, mb in split.items():
        print(f"  {name:<24} {mb:7.1f} MB")
    pipe.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": rows, "models": models, "tokens": len(res.token_ids),
                       "owners_mb": split}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
