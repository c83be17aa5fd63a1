"""Distillation data for the draft: the target's own generations, with its top-k log-probs.

    .venv/bin/python -m tools.draft_data --out DIR [--code 1500 --chat 1500 --max-new 128]

Prompts come from :mod:`tools.draft_prompts` (stdlib functions and template instructions, never
benchmark questions), wrapped in the target's chat template. The target (transformers, batched,
left-padded) answers each prompt greedily or by sampling at temperature 0.7 (one shard in three);
for every generated position the shard keeps the token and the target's top-``k`` log-probs over
the full vocabulary. Shards (``DIR/shard-XXXX.pt``) are written as they finish, so training can
start before the data is complete; an interrupted run resumes at the next missing shard.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tools.draft_prompts import chat_prompts, code_prompts, doc_prompts, resembles_benchmark


def build_prompts(n_code: int, n_chat: int, seed: int, code_seed: int = 0,
                  code_offset: int = 0, n_doc: int = 0, constrained: bool = False,
                  code_root: str | None = None) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs, code, chat and reading tasks interleaved deterministically."""
    items = [("code", t) for t in code_prompts(n_code, code_seed, root=code_root,
                                               offset=code_offset, typed=code_root is not None)]
    items += [("chat", t) for t in chat_prompts(n_chat, seed, constrained=constrained)]
    items += [("chat", t) for t in doc_prompts(n_doc, seed)]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g).tolist()
    return [items[i] for i in order]


@torch.no_grad()
def generate_shard(model, tok, batch: list[tuple[str, str]], max_new: int, sample: bool,
                   top_k: int, seed: int) -> dict:
    """Generate one batch and keep, per generated position, the target's top-k log-probs."""
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                   tokenize=True) for _, t in batch]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    torch.manual_seed(seed)
    kw = dict(do_sample=sample, max_new_tokens=max_new, output_logits=True,
              return_dict_in_generate=True, pad_token_id=pad)
    if sample:
        kw.update(temperature=0.7, top_k=0, top_p=1.0)
    out = model.generate(input_ids=input_ids, attention_mask=mask, **kw)
    gen = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1).float()  # [B, T, V] raw target logits
    logp = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = logp.topk(top_k, dim=-1)
    eos = set(model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
    rows = []
    for b, (kind, _) in enumerate(batch):
        g = gen[b].tolist()
        n = len(g)
        for j, t in enumerate(g):
            if t in eos:
                n = j + 1
                break
        rows.append(dict(kind=kind, text=batch[b][1], sampled=sample, prompt=ids[b], tokens=g[:n],
                         top_ids=top_ids[b, :n].to(torch.int32).clone(),
                         top_logp=top_lp[b, :n].to(torch.float16).clone()))
    return dict(rows=rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default=None, help="target model dir (default: SmolLM2)")
    ap.add_argument("--code", type=int, default=1500)
    ap.add_argument("--chat", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="chat prompts, order and sampling")
    ap.add_argument("--code-offset", type=int, default=0,
                    help="skip this many stdlib functions (a second data set: --code-offset "
                    "2000 --seed 1)")
    ap.add_argument("--exclude-previous", default=None, metavar="CODE,CHAT,SEED",
                    help="leave out the prompts of a data set made with these --code, --chat "
                    "and --seed")
    ap.add_argument("--code-root", default=None,
                    help="cut the code prompts from the Python files under this folder "
                    "(default: the standard library, ~3,700 functions); from another folder, only "
                    "typed functions that are not methods (HumanEval's form)")
    ap.add_argument("--doc", type=int, default=0,
                    help="reading tasks over the standard library's docstrings")
    ap.add_argument("--constrained", action="store_true",
                    help="40%% of the chat prompts get a second part (a length, tone, form)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)

    import transformers

    from pipespec_fast.models.defaults import default_target_dir

    torch.set_num_threads(args.threads)
    target = args.target or str(default_target_dir())
    tok = transformers.AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    model = transformers.LlamaForCausalLM.from_pretrained(
        target, dtype=getattr(torch, args.dtype)).eval()
    items = build_prompts(args.code, args.chat, args.seed, code_offset=args.code_offset,
                          n_doc=args.doc, constrained=args.constrained,
                          code_root=args.code_root)
    if args.exclude_previous:  # a second data set: leave out the first one's prompts
        n_code, n_chat, seed = (int(x) for x in args.exclude_previous.split(","))
        seen = {t for _, t in build_prompts(n_code, n_chat, seed)}
        items = [it for it in items if it[1] not in seen]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(items) + args.batch - 1) // args.batch
    t0, n_tok = time.perf_counter(), 0
    for s in range(n_shards):
        path = out / f"shard-{s:04d}.pt"
        if path.exists():
            continue
        batch = [it for it in items[s * args.batch : (s + 1) * args.batch]
                 if not resembles_benchmark(it[1])]
        if not batch:
            continue
        # sort inside the batch is not needed: prompts are short and similar in length
        shard = generate_shard(model, tok, batch, args.max_new, sample=(s % 3 == 2),
                               top_k=args.top_k, seed=args.seed * 100003 + s)
        tmp = path.with_suffix(".tmp")
        torch.save(shard, tmp)
        tmp.rename(path)
        n_tok += sum(len(r["tokens"]) for r in shard["rows"])
        dt = time.perf_counter() - t0
        print(f"shard {s + 1}/{n_shards}: {n_tok} tokens, {n_tok / dt:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
