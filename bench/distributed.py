"""Threads against processes: one PipeSpec hierarchy as threads of one process and as
``torch.distributed`` ranks (one process per model, gloo on loopback), in one run,
interleaved prompt by prompt so that machine noise hits both placements alike.

    .venv/bin/python bench/distributed.py --prompts 4 --max-new-tokens 64

Hierarchies: ``draft->target`` and ``ngram->draft->target`` (the default on a GPU or 4+ cores; as
ranks, the n-gram drafter runs inline on the draft's rank, its copy on the target's). Models:
``--models`` (smallest first), by default the default ones
(``pipespec_fast.models.defaults.default_model_dirs``). Prompts: ``--prompts`` HumanEval and
as many MT-Bench prompts (``bench/e2e.py``'s ``load_prompts``, with the chat template),
greedy, ``--max-new-tokens`` each (eos ignored). Both placements must give the same tokens
(greedy; reported, never hidden).

The ranks are this script again (``--serve``), started once with a TCP init on loopback and
kept for the whole run: each reads one request a line on stdin and answers on stdout. Every
generation's time is the target's own (``stats["seconds"]``: from the request to the last
token, the ranks' start handshake included). Reported per hierarchy and placement: tokens/s
(all tokens over all seconds), the ratio processes / threads (that, and the geometric mean
of the per-prompt ratios), the target's acceptance of its drafts and its wait share (seconds
waiting for a message over the generation's seconds).

Writes ``bench/results/distributed.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HIERARCHIES = {"draft->target": False, "ngram->draft->target": True}  # name -> n-gram below
PLACEMENTS = ("threads", "processes")
TAG = "@@pipespec-bench "  # a rank's reply line on stdout (anything else there is ignored)
REPLY_TIMEOUT_S = 900.0  # one generation, the slowest imaginable
START_TIMEOUT_S = 300.0  # the ranks load their models and join the group


def record(res) -> dict:
    """What one generation measured (both placements)."""
    st = res.stats
    return {"tokens": st["new_tokens"], "seconds": st["seconds"],
            "tokens_per_s": st["tokens_per_s"], "ids": res.token_ids, "stages": st["stages"]}


# ----------------------------------------------------------------------------- the ranks


def rank_pipelines(dirs: list[str], max_len: int) -> dict:
    """This rank's pipeline for each hierarchy (a collective: every rank builds them in the
    same order), sharing the one model this rank loads."""
    from pipespec_fast import FastPipeline
    from pipespec_fast.pipespec.placement import make_placement

    full = FastPipeline.from_pretrained(dirs, distributed=True, ngram=True, max_len=max_len)
    model = full.stages[-1]
    two = FastPipeline([model], tokenizer=full.tokenizer,
                       placement=make_placement([model], ngram=False))
    return {"draft->target": two, "ngram->draft->target": full}


def serve(rank: int, world: int, port: int, dirs: list[str], max_len: int) -> int:
    """One rank: answer each request line on stdin (``{"hierarchy", "ids", "n"}``) with one
    tagged line on stdout, until ``{"quit": true}`` or the end of stdin."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    pipes = rank_pipelines(dirs, max_len)
    _reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            res = pipes[req["hierarchy"]].generate(req["ids"], req["n"], ignore_eos=True)
            _reply(record(res))
        except Exception as e:  # the coordinator stops the run, naming the rank
            _reply({"error": f"{type(e).__name__}: {e}".splitlines()[0]})
            return 1
    for p in pipes.values():
        p.close()
    dist.destroy_process_group()
    return 0


def _reply(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Ranks:
    """The rank processes (``serve``), one per model: started together, driven request by
    request, and ended (killed if need be) by :meth:`close`."""

    def __init__(self, dirs: list[str], max_len: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        world = len(dirs)
        self.procs = [subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(r), str(world),
             str(port), "--models", *dirs, "--max-len", str(max_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for r in range(world)]
        self.replies = [queue.SimpleQueue() for _ in self.procs]
        for p, q in zip(self.procs, self.replies, strict=True):
            threading.Thread(target=_read_replies, args=(p, q), daemon=True).start()
        try:
            self._collect(START_TIMEOUT_S)
        except BaseException:
            self.close(grace_s=0.0)
            raise

    def generate(self, hierarchy: str, ids: list[int], n: int) -> list[dict]:
        """Every rank's record of one generation (the target's last)."""
        line = json.dumps({"hierarchy": hierarchy, "ids": ids, "n": n}) + "\n"
        for p in self.procs:
            p.stdin.write(line)
            p.stdin.flush()
        return self._collect(REPLY_TIMEOUT_S)

    def _collect(self, timeout_s: float) -> list[dict]:
        out = []
        for r, q in enumerate(self.replies):
            try:
                reply = q.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"rank {r}: no answer within {timeout_s:.0f} s") from None
            if reply is None or "error" in reply:
                why = "exited" if reply is None else reply["error"]
                raise RuntimeError(f"rank {r}: {why} (its stderr is above)")
            out.append(reply)
        return out

    def close(self, grace_s: float = 30.0) -> list[int]:
        """Ask every rank to quit, kill any still running ``grace_s`` later; their exit
        codes."""
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.close()
            except OSError:
                pass  # it exited already
        for p in self.procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]


def _read_replies(proc: subprocess.Popen, q: queue.SimpleQueue) -> None:
    for line in proc.stdout:
        if line.startswith(TAG):
            q.put(json.loads(line[len(TAG):]))
    q.put(None)  # the rank's stdout closed: it exited


# ----------------------------------------------------------------------------- the run


def thread_pipelines(dirs: list[str], max_len: int) -> dict:
    """The same hierarchies as threads of this process (the two-stage one shares the
    loaded models, as ``bench/e2e.py``'s systems do), without the regime bandit."""
    from pipespec_fast import FastPipeline

    # regimes=False: a distributed pipeline has no regime bandit (it always runs the whole
    # hierarchy): the threads run the same way, so the comparison is placement alone
    full = FastPipeline.from_pretrained(dirs, ngram=True, max_len=max_len, regimes=False)
    two = FastPipeline(list(full.stages[1:]), tokenizer=full.tokenizer, regimes=False)
    return {"draft->target": two, "ngram->draft->target": full}


def merge_ranks(replies: list[dict]) -> dict:
    """One record from every rank's: the target's figures; the stages of the draft's rank
    (the inline n-gram drafter first), then the target."""
    out = dict(replies[-1])
    out["stages"] = [s for r in replies[:-1] for s in r["stages"]] + replies[-1]["stages"][-1:]
    return out


def measure(dirs: list[str], prompts: list[list[int]], n: int, max_len: int,
            threads: dict) -> tuple[dict, list[int]]:
    """Every prompt on every hierarchy in both placements (their order alternating from one
    prompt to the next); returns the runs per hierarchy and placement, and the ranks' exit
    codes."""
    ranks = Ranks(dirs, max_len)
    try:
        for h in HIERARCHIES:  # warm-up: first-use costs stay out of the figures
            threads[h].generate(prompts[0][:32], 4, ignore_eos=True)
            ranks.generate(h, prompts[0][:32], 4)
        runs = {h: {p: [] for p in PLACEMENTS} for h in HIERARCHIES}
        for i, ids in enumerate(prompts):
            for h in HIERARCHIES:
                for place in PLACEMENTS if i % 2 == 0 else PLACEMENTS[::-1]:
                    if place == "threads":
                        r = record(threads[h].generate(ids, n, ignore_eos=True))
                    else:
                        r = merge_ranks(ranks.generate(h, ids, n))
                    r["prompt"] = i
                    runs[h][place].append(r)
                    print(f"prompt {i}: {h:22s} {place:9s} {r['tokens_per_s']:6.1f} tok/s",
                          file=sys.stderr)
    finally:
        codes = ranks.close()
    return runs, codes


def summarize(runs: dict) -> dict:
    """Per hierarchy: each placement's tokens/s, acceptance and target wait share; the
    ratio processes / threads; whether both gave the same tokens for every prompt."""
    out = {}
    for h, by_place in runs.items():
        d = {}
        for place, rs in by_place.items():
            tokens = sum(r["tokens"] for r in rs)
            seconds = sum(r["seconds"] for r in rs)
            target = [r["stages"][-1] for r in rs]
            stages = len(rs[0]["stages"])
            d[place] = {
                "tokens_per_s": tokens / seconds,
                "acceptance": [sum(r["stages"][i]["accepted"] for r in rs)
                               / max(1, sum(r["stages"][i]["proposed"] for r in rs))
                               for i in range(1, stages)],
                "target_wait_share": sum(t["idle_s"] for t in target) / seconds,
                "tokens": tokens, "seconds": seconds}
        t, p = by_place["threads"], by_place["processes"]
        d["ratio_processes_threads"] = d["processes"]["tokens_per_s"] / \
            d["threads"]["tokens_per_s"]
        d["ratio_geomean_per_prompt"] = math.exp(sum(
            math.log(b["tokens_per_s"] / a["tokens_per_s"]) for a, b in zip(t, p, strict=True))
            / len(t))
        d["same_output"] = all(a["ids"] == b["ids"] for a, b in zip(t, p, strict=True))
        out[h] = d
    return out


def table(summary: dict) -> str:
    rows = ["| hierarchy | threads tok/s | processes tok/s | processes/threads (geomean) | "
            "target acceptance thr / proc | target wait share thr / proc | same tokens |",
            "|---|---:|---:|---:|---:|---:|:---:|"]
    for h, d in summary.items():
        t, p = d["threads"], d["processes"]
        rows.append(f"| {h} | {t['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} | "
                    f"{d['ratio_processes_threads']:.2f} ({d['ratio_geomean_per_prompt']:.2f})"
                    f" | {t['acceptance'][-1]:.2f} / {p['acceptance'][-1]:.2f} | "
                    f"{t['target_wait_share']:.0%} / {p['target_wait_share']:.0%} | "
                    f"{'yes' if d['same_output'] else 'NO'} |")
    return "\n".join(rows)


def prompts_for(pipe, per_task: int) -> list[list[int]]:
    """``per_task`` HumanEval then as many MT-Bench prompts, as chat-templated token ids."""
    from e2e import load_prompts

    return [pipe.chat_prompt(text) for task in ("humaneval", "mtbench")
            for text in load_prompts(task, per_task)]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.serve:
        rank, world, port = args.serve
        return serve(rank, world, port, args.models, args.max_len)
    if args.models is None:
        from pipespec_fast.models.defaults import default_model_dirs

        args.models = [str(d) for d in default_model_dirs()]
    if len(args.models) != 2:
        raise SystemExit("--models: a draft and a target (two ranks)")
    threads = thread_pipelines(args.models, args.max_len)
    prompts = prompts_for(threads["ngram->draft->target"], args.prompts)
    runs, codes = measure(args.models, prompts, args.max_new_tokens, args.max_len, threads)
    for p in threads.values():
        p.close()
    summary = summarize(runs)
    import torch

    meta = {"models": args.models, "prompts": len(prompts), "max_new_tokens":
            args.max_new_tokens, "backend": "gloo (loopback)", "rank_exit_codes": codes,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    for h in runs:  # the tokens are only for the comparison
        for rs in runs[h].values():
            for r in rs:
                r.pop("ids")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    print(table(summary))
    print(f"\nwritten: {out}")
    return 0 if all(d["same_output"] for d in summary.values()) and not any(codes) else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="HumanEval and as many MT-Bench")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", help="draft and target dirs (default: the default "
                    "models)")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    ap.add_argument("--serve", nargs=3, type=int, metavar=("RANK", "WORLD", "PORT"),
                    help=argparse.SUPPRESS)  # internal: run as one rank
    return ap


if __name__ == "__main__":
    sys.exit(main())
