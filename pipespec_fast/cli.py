"""``pipespec-fast generate | models | convert``.

Errors are one line on stderr: exit code 2 for a mistake in the arguments or the files they
name (checked before any model is loaded where possible), 1 for a failure while running, 130
on Ctrl-C. ``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipespec_fast import validate

EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(ValueError):
    """A command-line argument (or a file it names) is wrong."""


def _as_flag(e: ValueError) -> UsageError:
    """The validation layer names API arguments (``max_new_tokens``); say the flag instead."""
    msg = re.sub(r"^([a-z_]+)\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
    return UsageError(msg)


def _check_model_dir(path: str) -> None:
    p = Path(path)
    try:
        if not p.exists():
            raise UsageError(f"--models: {path}: no such folder")
        if not p.is_dir():
            raise UsageError(f"--models: {path}: not a folder")
        if not (p / "config.json").is_file():
            raise UsageError(f"--models: {path}: no config.json in this folder")
    except OSError as e:  # a symlink loop, a permission error
        raise UsageError(f"--models: {path}: {e.strerror or e}") from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {device!r}: only cpu and cuda are supported")


def _check_generate_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, before the (seconds-long) load."""
    try:
        validate.generation(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed, mode_=args.mode)
        validate.max_len(args.max_len)
        validate.tree_budget(args.tree_budget)
    except ValueError as e:
        raise _as_flag(e) from None
    if args.compute is not None and args.compute not in validate.COMPUTE_MODES:
        raise UsageError(f"--compute: expected one of {', '.join(validate.COMPUTE_MODES)}, "
                         f"got {args.compute!r}")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    if args.ngram and not args.models:
        raise UsageError("--ngram goes with --models (the default hierarchy has one already)")
    if args.tree_budget and args.models and not args.ngram and args.mode != "sync":
        raise UsageError("--tree-budget with --models needs --ngram (the n-gram drafter makes "
                         "the trees) or --mode sync (the first model's trees)")
    if args.no_draft and args.draft:
        raise UsageError("--draft and --no-draft: give one of them (neither: the draft where "
                         "the machine has 4+ cores or a GPU)")
    if (args.no_draft or args.draft) and args.models:
        raise UsageError(f"--{'no-' if args.no_draft else ''}draft applies to the default "
                         "hierarchy, not to --models")
    if args.ngram_store is not None and args.models and not args.ngram:
        raise UsageError("--ngram-store with --models needs --ngram (the drafter that reads it)")
    if args.ngram_store not in (None, "none") and not args.distributed:  # a rank: its own
        store = Path(args.ngram_store)
        if not (store / "store.json").is_file():
            raise UsageError(f"--ngram-store: {store}: no store.json in this folder")
    if not args.distributed:  # a rank checks its own folder only (_check_own_model_dir)
        for m in args.models or []:
            _check_model_dir(m)
    _check_device(args.device)
    if args.distributed and args.mode != "pipespec":
        raise UsageError("--distributed runs --mode pipespec only")


def _init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (gloo); ``True`` if this call made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    try:
        dist.init_process_group("gloo")
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--distributed: run under torchrun, one process per model ({first})"
                         ) from None
    return True


def _check_own_model_dir(models: list[str]) -> None:
    """Under ``--distributed``, rank i checks ``--models``' i-th folder only (a host needs
    only its ranks' folders); every rank learns whether every rank found its own (a
    collective: a folder missing on one host ends every rank naming it)."""
    import torch.distributed as dist

    from pipespec_fast.pipespec.rank_files import together

    rank = dist.get_rank()
    together("checking its --models folder",
             lambda: _check_model_dir(models[rank]) if rank < len(models) else None)


def _generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    import torch

    from pipespec_fast import FastPipeline

    dtype = None if args.dtype is None else {  # None: bf16 on CUDA, fp32 elsewhere
        "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    }[args.dtype]
    kw = dict(device=args.device, dtype=dtype, mode=args.mode, max_len=args.max_len,
              compute=args.compute, tree_budget=args.tree_budget)
    if args.ngram_store is not None:  # "none": the default hierarchy's drafter without one
        kw["ngram_store"] = None if args.ngram_store == "none" else args.ngram_store
    if args.distributed:
        return _generate_distributed(args, kw)
    if args.models:
        pipe = FastPipeline.from_pretrained(args.models, ngram=args.ngram, **kw)
    else:
        pipe = FastPipeline.from_default(draft=_draft_choice(args), **kw)
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


def _draft_choice(args: argparse.Namespace) -> bool | None:
    """``FastPipeline.from_default``'s ``draft``: forced by ``--draft`` / ``--no-draft``, else
    ``None`` (its choice by the machine)."""
    return True if args.draft else False if args.no_draft else None


def _generate_distributed(args: argparse.Namespace, kw: dict) -> int:
    """One rank of ``torchrun ... -m pipespec_fast generate --distributed``: rank i runs model
    i; the target's rank (the last) prints the text as it is verified and the summary, the
    others print nothing."""
    with _interrupt_once():
        return _run_rank(args, kw)


@contextmanager
def _interrupt_once() -> Iterator[None]:
    """The first SIGINT raises ``KeyboardInterrupt``; later ones are ignored while this rank
    closes its links (bounded: a link waits at most its peer timeout). ``torchrun`` forwards
    one SIGINT to each rank, but Ctrl-C pressed twice, or a launcher that signals both the
    rank and its process group, can deliver more: a second ``KeyboardInterrupt`` inside the
    shutdown would leave a neighbour without the message saying why this rank stops.

    A rank leaving with an error or an interrupt (its process is about to exit) goes on
    ignoring SIGINT: when a neighbour was interrupted first, this rank fails naming it and
    the SIGINT forwarded to it a moment later must not print a traceback over that line."""
    import torch.distributed as dist

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    except BaseException:
        if not dist.is_initialized():  # no rank yet (a usage error): nothing to protect
            signal.signal(signal.SIGINT, previous)
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGINT, previous)


def _run_rank(args: argparse.Namespace, kw: dict) -> int:
    import torch.distributed as dist


    made = _init_distributed()
    try:
        _run_pipeline(args, kw)
    finally:
        # on a failure too: a process leaving with its group alive was seen to abort at exit
        # ("terminate called without an active exception", exit code -6) after its error line
        if made:
            _left_group.append(_rank_note())  # main's last line still names the rank
            dist.destroy_process_group()
    return 0


def _run_pipeline(args: argparse.Namespace, kw: dict) -> None:
    from pipespec_fast import FastPipeline

    if args.models:
        _check_own_model_dir(args.models)
        pipe = FastPipeline.from_pretrained(args.models, ngram=args.ngram, distributed=True,
                                            **kw)
    else:
        pipe = FastPipeline.from_default(draft=_draft_choice(args), distributed=True, **kw)
    with pipe:
        prompt: str | list[int] = args.prompt
        if pipe.tokenizer is not None and not args.no_chat:
            prompt = pipe.chat_prompt(args.prompt)
        gen = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, ignore_eos=args.ignore_eos)
        if not pipe.placement.is_target:
            pipe.generate(prompt, args.max_new_tokens, **gen)
        else:
            t = time.perf_counter()
            _print_answer(pipe, prompt, args.max_new_tokens, gen)
            res = pipe.last_result
            dt = time.perf_counter() - t
            print(_summary(pipe.placement, res, dt))


def _summary(placement, res, dt: float) -> str:
    """The target's rank's last line: the chain with each stage's rank, the speed, and the
    target's acceptance of its drafts (the other stages' figures are on their ranks)."""
    n, target = len(res.token_ids), res.stage_stats[-1]
    return (f"[pipespec, {placement.world} ranks: {placement.chain()}] {n} tokens, {dt:.2f} s, "
            f"{n / dt:.1f} tokens/s, acceptance {target.name} {target.acceptance_rate:.0%}"
            f"{_rows_note(placement)}")


def _rows_note(placement) -> str:
    """``, rows: nccl`` where the rows reach the target's rank on a route of their own
    (``pipespec/payload.py``); nothing where they travel with the control messages."""
    routes = placement.routes
    return f", rows: {routes[-1]}" if routes and routes[-1] != "inline" else ""


def _print_answer(pipe, prompt, max_new_tokens: int, gen: dict) -> None:
    """The answer on stdout: streamed as text, or the token ids without a tokenizer."""
    if pipe.tokenizer is None:
        print(pipe.generate(prompt, max_new_tokens, **gen).token_ids)
        return
    for piece in pipe.stream(prompt, max_new_tokens, **gen):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()


def _models(args: argparse.Namespace) -> int:
    from pipespec_fast.models.defaults import default_model_dirs

    for d in default_model_dirs():
        print(d)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pipespec_fast.models.convert_gguf import convert_gguf

    if not Path(args.gguf).is_file():
        raise UsageError(f"{args.gguf}: no such GGUF file")

    out = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipespec-fast",
                                description="Hierarchical pipelined speculative decoding")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text, printing it as it is verified")
    g.add_argument("--prompt", required=True)
    g.add_argument("--models", nargs="+", help="model dirs, smallest first, target last "
                   "(default: the embedded default hierarchy)")
    g.add_argument("--ngram", action="store_true",
                   help="with --models: put an n-gram prompt-lookup drafter below them")
    g.add_argument("--ngram-store", metavar="DIR|none",
                   help="the n-gram drafter's store of the target's answers (a folder made by "
                   "tools/ngram_store.py; default: the embedded one for the default hierarchy, "
                   "none with --models; 'none': without)")
    g.add_argument("--no-draft", action="store_true",
                   help="default hierarchy without the distilled draft: n-gram -> target "
                   "(the default on a CPU with fewer than 4 usable cores, unless --distributed)")
    g.add_argument("--draft", action="store_true",
                   help="default hierarchy with the distilled draft whatever the cores: "
                   "n-gram -> draft -> target (the default on a GPU or 4+ cores)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--mode", choices=["pipespec", "sync", "ar"], default="pipespec")
    g.add_argument("--compute",
                   help="products on packed Q4_1/Q8_0 weights: exact (fp32, greedy equals "
                        "transformers) or int8 (int8 activations; greedy equals int8 AR); "
                        "default: int8 for a model with such weights (the default target), "
                        "exact otherwise")
    g.add_argument("--tree-budget", type=int, default=0,
                   help="nodes of the lowest drafter's token trees (0: chains): the n-gram "
                        "drafter's, or with --models and --mode sync the first model's")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights and KV cache; default: bfloat16 on CUDA, float32 elsewhere")
    g.add_argument("--max-len", type=int, default=2048, help="KV cache length per stage")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--distributed", action="store_true",
                   help="one process per model under torchrun (rank i runs model i, the last "
                        "rank the target, which prints the answer): torchrun --standalone "
                        "--nproc-per-node K -m pipespec_fast generate --distributed ...")
    g.set_defaults(func=_generate)
    m = sub.add_parser("models", help="print the default model directories, target last")
    m.set_defaults(func=_models)
    c = sub.add_parser("convert", help="convert a LLaMA GGUF file to safetensors + tokenizer")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_convert)
    return p


def _is_usage(e: BaseException) -> bool:
    """A mistake in what the user gave (arguments, files), not a failure while running."""
    # UsageError, the loaders' CheckpointError and every validation error are ValueErrors; a
    # failure inside a running stage arrives as StageError (a RuntimeError)
    return isinstance(e, ValueError | FileNotFoundError | NotADirectoryError)


_left_group: list[str] = []  # the rank note of a group this process has left (_run_rank)


def _rank_note() -> str:
    """`` (rank r of w)`` in a process of a ``torch.distributed`` group, or one that was in
    one (each rank's line says which rank it is), else nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return _left_group[-1] if _left_group else ""
    return f" (rank {dist.get_rank()} of {dist.get_world_size()})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on a malformed command
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\npipespec-fast: interrupted{_rank_note()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        sys.stderr.close()
        return EXIT_RUNTIME
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_usage(e):
            print(f"pipespec-fast: error: {text}", file=sys.stderr)
            return EXIT_USAGE
        print(f"pipespec-fast: error: {type(e).__name__}: {text}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
