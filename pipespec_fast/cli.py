"""``pipespec-fast generate | models | convert``."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pipespec_fast import FastPipeline

    dtype = {"float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    kw = dict(device=args.device, dtype=dtype, mode=args.mode, max_len=args.max_len)
    if args.models:
        pipe = FastPipeline.from_pretrained(args.models, ngram=args.ngram, **kw)
    else:
        pipe = FastPipeline.from_default(draft=not args.no_draft, **kw)
    with pipe:
        tok = pipe.tokenizer
        prompt: str | list[int] = args.prompt
        if tok is not None and not args.no_chat:
            prompt = pipe.chat_prompt(args.prompt)
        gen = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, ignore_eos=args.ignore_eos)
        t = time.perf_counter()
        if tok is None:
            res = pipe.generate(prompt, args.max_new_tokens, **gen)
            print(res.token_ids)
        else:
            for piece in pipe.stream(prompt, args.max_new_tokens, **gen):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            res = pipe.last_result
        dt = time.perf_counter() - t
        n = len(res.token_ids)
        names = " -> ".join(s.name for s in res.stage_stats)
        acc = ", ".join(f"{s.name} {s.acceptance_rate:.0%}" for s in res.stage_stats[1:])
        print(f"[{res.stats['mode']}: {names}] {n} tokens, {dt:.2f} s, {n / dt:.1f} tokens/s"
              + (f", acceptance {acc}" if acc else ""))
    return 0


def _models(args: argparse.Namespace) -> int:
    from pipespec_fast.models.defaults import default_model_dirs

    for d in default_model_dirs():
        print(d)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pipespec_fast.models.convert_gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipespec-fast",
                                description="Hierarchical pipelined speculative decoding")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text, printing it as it is verified")
    g.add_argument("--prompt", required=True)
    g.add_argument("--models", nargs="+", help="model dirs, smallest first, target last "
                   "(default: the embedded default hierarchy)")
    g.add_argument("--ngram", action="store_true",
                   help="with --models: put an n-gram prompt-lookup drafter below them")
    g.add_argument("--no-draft", action="store_true",
                   help="default hierarchy without the distilled draft: n-gram -> target")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--mode", choices=["pipespec", "sync", "ar"], default="pipespec")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--max-len", type=int, default=2048, help="KV cache length per stage")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=_generate)
    m = sub.add_parser("models", help="print the default model directories, target last")
    m.set_defaults(func=_models)
    c = sub.add_parser("convert", help="convert a LLaMA GGUF file to safetensors + tokenizer")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pipespec-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
