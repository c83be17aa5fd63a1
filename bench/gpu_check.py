"""The first thing to run whenever a GPU is available (``scripts/gpu_check.sh``; issue 13).

Checks the compiled Triton kernels against the torch references (chains and trees;
SmolLM2-, Llama-3-8B- and 70B-shaped heads; fp32, fp16, bf16), greedy equality of pipespec /
sync / ar with random-weight models of realistic shapes (and, bit for bit, in batch-invariant mode:
``gpu_check_exact.py``), the stochastic kernel's output
distribution (chi-square), and measures attention against ``scaled_dot_product_attention``
(with the share of measured memory bandwidth), acceptance latency, forward time (device and
host enqueue) and tokens/s per mode.

Every section has a time budget so the whole run stays under 8 minutes on one H200; a failing
or crashing check is recorded and the run goes on. One JSON is written (after every section,
so a killed run still leaves what it measured). Exit code 1 when a correctness check failed or
anything raised, 0 otherwise.

Needs only torch, triton and this repository: no network, no flash-attn, no scipy.
``--dry-run`` runs the same code on CPU tensors through Triton's interpreter with tiny sizes
(CI: ``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
# Seconds per section, in run order: 460 s in all, under the 8-minute goal with start-up.
BUDGETS = {"kernels": 150, "sampling": 25, "models": 90, "kernel_benchmarks": 60,
           "model_benchmarks": 105, "exact": 30}
# Budgets are checked between checks; a check that hangs (a deadlocked pipeline) is caught by
# this watchdog instead, so the run still ends inside 8 minutes with its JSON written.
DEADLINE_S = 470


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="the JSON to write")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors, Triton's interpreter, tiny sizes (for CI)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every section's time budget")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S,
                    help="seconds after which a run still going (a hang) is aborted: the JSON "
                         "names the check that was running, exit code 1")
    return ap.parse_args(argv)


def environment(sz) -> dict:
    import torch
    import triton

    import pipespec_fast.kernels

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "kernels_from": str(Path(pipespec_fast.kernels.__file__).parent),
           "triton": triton.__version__, "device": sz.device,
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if sz.cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def summary(sections: dict) -> dict:
    """Counts per status; ``ok``: nothing failed; ``complete``: no correctness check was
    skipped for want of time (a cold GPU compiling every kernel can run a section out of its
    budget: an OK that checked less must say so)."""
    counts = {"pass": 0, "fail": 0, "error": 0, "skipped": 0, "measured": 0}
    failed, unchecked = [], []
    for sec in sections.values():
        for c in sec["checks"]:
            counts[c["status"]] += 1
            if c["status"] in ("fail", "error"):
                failed.append(c["name"])
            elif c["status"] == "skipped" and c.get("kind") == "correctness":
                unchecked.append(c["name"])
    return {**counts, "failed_checks": failed, "skipped_correctness": unchecked,
            "ok": not failed, "complete": not unchecked}


def run(args: argparse.Namespace) -> dict:
    import gpu_check_exact as exact
    import gpu_check_kernels as kernels
    import gpu_check_models as models
    import torch
    from gpu_check_common import DRY, FULL, Section

    from pipespec_fast import config

    sz = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available (use --dry-run on a CPU)")
    report = {"schema": 1, "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "environment": environment(sz), "notes": [kernels.bytes_per_token_note(),
                        "the CPU C library is off (c_kernels=False): CPU-side draws use torch"],
              "sections": {}}
    plan = [("kernels", kernels.kernel_checks), ("sampling", _sampling(kernels)),
            ("models", models.model_checks), ("kernel_benchmarks", kernels.kernel_benchmarks),
            ("model_benchmarks", models.model_benchmarks), ("exact", exact.exact_checks)]
    t0 = time.perf_counter()
    live: dict = {}
    watchdog = threading.Timer(args.deadline, _abort, (args, report, live))
    watchdog.daemon = True
    watchdog.start()
    # No CPU C library: building it with gcc on a fresh GPU machine (the n-gram stage's CPU
    # draws would) costs budget and checks nothing GPU-side; torch runs those draws, same bits.
    # A dry run also forces the Triton backend (CPU tensors would otherwise take the
    # references).
    cfg = config.current().replace(c_kernels=False)
    if args.dry_run:
        cfg = cfg.replace(backend="triton")
    with config.use(cfg):
        for name, fn in plan:
            sec = live["section"] = Section(name, BUDGETS[name] * args.budget_scale)
            fn(sec, sz)
            report["sections"][name] = sec.to_json()
            report["wall_s"] = round(time.perf_counter() - t0, 2)
            report["summary"] = summary(report["sections"])
            _write(args.out, report)
            _progress(name, sec)
    watchdog.cancel()
    return report


def _abort(args: argparse.Namespace, report: dict, live: dict) -> None:
    """The watchdog: record where the run hung, write the JSON, end the process (a hung CUDA
    call or worker thread would not return to Python)."""
    sec = live.get("section")
    where = f"{sec.name}/{sec.current}" if sec is not None else "start-up"
    if sec is not None:
        report["sections"][sec.name] = sec.to_json()
    report["aborted"] = f"deadline of {args.deadline:.0f} s reached during {where}"
    report["summary"] = {**summary(report["sections"]), "ok": False}
    report["summary"]["failed_checks"].append(where)
    _write(args.out, report)
    print(f"[gpu_check] ABORTED: {report['aborted']} -> {args.out}", flush=True)
    os._exit(1)


def _sampling(kernels):
    def sampling(sec, sz):
        sec.run("stochastic_accept/chi_square_first_token", "correctness",
                kernels.check_sampling_chi_square, sz)
    return sampling


def _write(path: str, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out)


def _progress(name: str, sec) -> None:
    counts: dict[str, int] = {}
    for c in sec.checks:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    bad = [c["name"] for c in sec.checks if c["status"] in ("fail", "error")]
    print(f"[gpu_check] {name}: {counts} in {sec.to_json()['wall_s']:.1f} s"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Triton reads the flag when a kernel is decorated: before anything imports Triton.
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    report = run(args)
    s = report["summary"]
    verdict = "FAILED" if not s["ok"] else "OK" if s.get("complete", True) else \
        f"OK BUT INCOMPLETE ({len(s['skipped_correctness'])} correctness checks skipped for " \
        "time: rerun with --budget-scale 2)"
    print(f"[gpu_check] {verdict}: {s['pass']} passed, {s['fail']} "
          f"failed, {s['error']} errors, {s['skipped']} skipped, {s['measured']} measured in "
          f"{report['wall_s']:.0f} s -> {args.out}", flush=True)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
