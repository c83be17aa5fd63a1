"""Host synchronisations and mid-generation compiles, checked on the GPU (``gpu_check.py``).

The engine's promise on CUDA (docs/ARCHITECTURE.md, "CUDA"): one host read per verify step
and per drafter's run of tokens, each an event wait on the stage's own stream, and nothing
else that synchronises: no ``.item()``, no pageable copy, no data-dependent shape. torch's
sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns on every synchronising
call except explicit event waits, so a generation that keeps the promise produces no warning
at all; each warning is recorded with the line that made it.

A pipeline rehearses every kind of step when it is built (``decoding/warm_up.py``), so the
first generation after it must not be slower than the second by a kernel compile (about a
second): both times are recorded.

``--dry-run``: the same generations on CPU tensors (Triton's interpreter), without the debug
mode (a CPU has no synchronisation to observe; ``tests/test_host_reads.py`` counts reads
there instead).
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
from gpu_check_common import Sizes
from gpu_check_models import _prompt, build_pair

from pipespec_fast import FastPipeline


@contextlib.contextmanager
def _sync_warnings(on: bool):
    """Records torch's sync-debug warnings (``[(where, message)]``) while ``on``."""
    if not on:
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        got: list = []
        try:
            yield got
        finally:
            torch.cuda.set_sync_debug_mode(0)
            got.extend((f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}", str(w.message)[:160])
                       for w in caught if "synchroniz" in str(w.message))


def check_host_syncs(sz: Sizes, dtype: torch.dtype) -> dict:
    """Greedy and sampled generations in ar, sync and pipespec modes under the sync debug
    mode: no synchronising call (``ok``); the pipeline's warm-up time, and the first and
    second generations' times after it."""
    draft, target = build_pair(sz, dtype, 5)
    t0 = time.perf_counter()
    pipe = FastPipeline([draft, target], adaptive_windows=False,
                        warm_up=None if sz.cuda else True)
    out = {"dtype": str(dtype).removeprefix("torch."),
           "warm_up_s": round(time.perf_counter() - t0, 2), "modes": {}}
    prompt, n = _prompt(sz), sz.new_tokens
    times = []
    for _ in range(2):  # the first generation after the warm-up, then the second
        t = time.perf_counter()
        pipe.generate(prompt, n, ignore_eos=True, mode="pipespec")
        times.append(round(time.perf_counter() - t, 3))
    out["first_generation_s"], out["second_generation_s"] = times
    total = 0
    for mode in ("ar", "sync", "pipespec"):
        for label, kw in (("greedy", {}), ("sampled", {"temperature": 0.8, "seed": 1})):
            with _sync_warnings(sz.cuda) as found:
                res = pipe.generate(prompt, n, ignore_eos=True, mode=mode, **kw)
            total += len(found)
            out["modes"][f"{mode}/{label}"] = {
                "tokens": len(res.token_ids), "syncs_flagged": len(found),
                "first_flagged": sorted(set(found))[:5]}
    pipe.close()
    out["syncs_flagged"] = total
    out["ok"] = total == 0 and all(m["tokens"] == n for m in out["modes"].values())
    return out
