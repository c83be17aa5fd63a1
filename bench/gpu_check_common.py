"""What every part of ``gpu_check.py`` shares: the problem sizes of a real run and of a dry run,
the section that runs checks under a time budget, and timing (CUDA events on a GPU, the wall
clock on the CPU).

A dry run executes the same functions with sizes small enough for Triton's interpreter on a
CPU, so CI catches a broken GPU check before a GPU is ever lent to the project.
"""

from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

# (n_heads, kv_heads, head_dim) of the models the engine targets.
HEADS_FULL = {"llama3_8b": (32, 8, 128), "smollm2_135m": (9, 3, 64), "llama3_70b": (64, 8, 128)}
# The same GQA ratios (3, 4, 8) with tiny head_dims, one of them not a power of two.
HEADS_DRY = {"group3": (6, 2, 16), "group4": (8, 2, 24), "group8": (8, 1, 16)}


@dataclass(frozen=True)
class Sizes:
    """Everything a check's size depends on."""

    device: str
    heads: dict
    dtypes: tuple
    blocks: tuple  # ("chain" | "tree", n) blocks of new tokens
    prefix: int  # cached tokens before the block in the correctness checks
    vocab: int  # acceptance kernels' vocabulary
    draws: int  # chi-square draws
    contexts: tuple  # attention benchmark context lengths
    copy_bytes: int  # the device copy that measures memory bandwidth
    model: dict  # LlamaConfig fields of the check models
    target_layers: int
    draft_layers: int
    prompt: int  # prompt tokens of the generation checks
    new_tokens: int
    iters: int  # timed iterations per benchmark (after 3 warm-ups)
    # the modes benchmark (gpu_check_modes.py): its target's layers (``model``'s shape), its
    # draft's shape (LlamaConfig fields; the vocabulary is ``model``'s), the tokens each mode
    # generates, and the oracle draft's acceptance rates (the first is the goal)
    bench_target_layers: int = 2
    bench_draft: dict = field(default_factory=dict)
    bench_new_tokens: int = 8
    acceptances: tuple = (0.7,)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


FULL = Sizes(
    device="cuda", heads=HEADS_FULL,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    blocks=(("chain", 9), ("tree", 16), ("chain", 1), ("tree", 64), ("chain", 64)),
    prefix=777, vocab=128256, draws=4000, contexts=(4096, 32768), copy_bytes=2 << 30,
    model=dict(vocab_size=128256, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128,
               intermediate_size=14336),
    target_layers=4, draft_layers=1, prompt=128, new_tokens=96, iters=20,
    # Llama-3-8B's 32 layers: the draft/target cost ratio of the goal
    bench_target_layers=32, bench_new_tokens=256, acceptances=(0.7, 0.5, 0.9),
    # SmolLM2-135M: 30 layers of width 576, 9 heads, 3 kv heads, tied embeddings (the shipped
    # models/drafts/SmolLM2-135M-draft is a 3-layer cut of it: its config.json has the rest)
    bench_draft=dict(n_layers=30, dim=576, n_heads=9, n_kv_heads=3, head_dim=64,
                     intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0),
)
DRY = Sizes(
    device="cpu", heads=HEADS_DRY, dtypes=(torch.float32, torch.float16),  # no bf16 in numpy
    blocks=(("chain", 1), ("chain", 5), ("tree", 8), ("tree", 33)),
    prefix=37, vocab=300, draws=100, contexts=(64, 256), copy_bytes=8 << 20,
    model=dict(vocab_size=96, dim=32, n_heads=4, n_kv_heads=2, head_dim=8,
               intermediate_size=64),
    target_layers=2, draft_layers=1, prompt=12, new_tokens=8, iters=2,
    bench_target_layers=2, bench_new_tokens=8, acceptances=(0.7,),
    bench_draft=dict(n_layers=3, dim=24, n_heads=3, n_kv_heads=1, head_dim=8,
                     intermediate_size=48, tie_word_embeddings=True, rope_theta=100000.0),
)


@dataclass
class Section:
    """Checks run in order while the section's budget lasts; each is recorded, none stops the
    run. ``kind`` is "correctness" (a failure makes the exit code non-zero) or "benchmark"
    (its figures; an exception in it is an error, which also counts as a failure)."""

    name: str
    budget_s: float
    checks: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    current: str | None = None  # the check running now (named if the run is aborted)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def run(self, name: str, kind: str, fn, *args, **kwargs) -> dict | None:
        entry = {"name": name, "kind": kind}
        if self.left() <= 0:
            entry["status"] = "skipped"
            entry["reason"] = f"section budget of {self.budget_s:.0f} s spent"
            self.checks.append(entry)
            return None
        t0 = time.perf_counter()
        self.current = name
        try:
            result = fn(*args, **kwargs)
            if kind == "correctness":
                entry["status"] = "pass" if result.pop("ok") else "fail"
            else:
                entry["status"] = "measured"
            entry["result"] = result
        except Exception as exc:  # recorded, and the run goes on
            entry["status"] = "error"
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
            result = None
        entry["wall_s"] = round(time.perf_counter() - t0, 3)
        self.checks.append(entry)
        self.current = None
        return result

    def to_json(self) -> dict:
        return {"budget_s": self.budget_s,
                "wall_s": round(time.perf_counter() - self.started, 3), "checks": self.checks}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, iters: int, warmup: int = 3) -> dict:
    """Median and min milliseconds of ``fn()``: CUDA events around each call on a GPU (device
    time), the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "iters": iters}


def host_and_device_ms(fn, device: str, iters: int) -> dict:
    """Host enqueue time (the call returns before the GPU is done) next to the device time of
    the same calls: how far a step is host-bound."""
    for _ in range(3):
        fn()
    sync(device)
    host = []
    t_all = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    total = (time.perf_counter() - t_all) * 1e3 / iters
    return {"host_enqueue_median_ms": round(statistics.median(host), 4),
            "wall_per_call_ms": round(total, 4), "iters": iters}
