"""One rank of a distributed pipeline under test (``tests/test_distributed.py`` starts one
process per rank): ``python dist_child.py RANK WORLD PORT SPEC.json``.

The spec names the model folders (``dirs``, or ``dirs_by_rank``: each rank's own list, as
ranks on different hosts see them), the request and what to break: ``raise_rank`` makes that
rank's stage raise after ``after`` forwards, ``kill_rank`` makes that rank kill itself
(SIGKILL) after ``after`` forwards, ``stop_rank`` makes it stop itself (SIGSTOP: a hung
process, its sockets open; it first writes ``OUT/stopped{r}.txt``, the monotonic time then),
``interrupt_rank`` sends that rank a SIGINT (Ctrl-C: a ``KeyboardInterrupt`` in its main
thread, exit code 130). Each rank writes
``OUT/rank{r}.json``: its result or its error's first line."""

import datetime
import json
import os
import signal
import sys
import time
import traceback

import torch.distributed as dist


def _break_stage(pipe, spec, rank) -> None:
    """Make this rank's model stage raise, or the process die, after ``after`` forwards."""
    stage = pipe.stages[-1]
    inner, count = stage.forward, [0]
    kill = spec.get("kill_rank") == rank
    stop = spec.get("stop_rank") == rank
    interrupt = spec.get("interrupt_rank") == rank

    def forward(*a, **kw):
        count[0] += 1
        if interrupt and count[0] == spec["after"] + 1:
            os.kill(os.getpid(), signal.SIGINT)  # the main thread raises KeyboardInterrupt
        elif count[0] > spec["after"] and not interrupt:
            if stop:
                with open(os.path.join(spec["out"], f"stopped{rank}.txt"), "w") as f:
                    f.write(repr(time.monotonic()))
                os.kill(os.getpid(), signal.SIGSTOP)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        return inner(*a, **kw)

    stage.forward = forward


def main() -> int:
    # Ctrl-C raises KeyboardInterrupt here, as in a rank torchrun starts, even when the test
    # run itself was started in the background (``nohup pytest &``: SIGINT ignored, and an
    # ignored signal stays ignored in every child)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rank, world, port, spec_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4]
    spec = json.load(open(spec_path))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    from pipespec_fast import FastPipeline

    out = {}
    code = 0
    try:
        dirs = spec["dirs_by_rank"][rank] if "dirs_by_rank" in spec else spec["dirs"]
        pipe = FastPipeline.from_pretrained(dirs, distributed=True, max_len=256,
                                            ngram=spec.get("ngram", False),
                                            ngram_store=spec.get("ngram_store"),
                                            adaptive_windows=spec.get("adaptive", False))
        out["has_store"] = any(getattr(s, "store", None) is not None for s in pipe.stages)
        if rank in (spec.get("raise_rank"), spec.get("kill_rank"), spec.get("stop_rank"),
                    spec.get("interrupt_rank")):
            _break_stage(pipe, spec, rank)
        results, accepted = [], 0
        for prompt in spec["prompts"]:
            for seed in spec.get("seeds", [None]):
                res = pipe.generate(prompt, spec["n"], ignore_eos=True, seed=seed,
                                    **spec.get("sampling", {}))
                results.append(res.token_ids)
                accepted += res.stage_stats[-1].accepted
        out["results"] = results
        out["stats"] = [s.as_dict() for s in res.stage_stats]
        out["accepted"] = accepted
        rows = pipe.placement.rows  # each link's row route, and the rows it carried
        out["routes"] = list(pipe.placement.routes)
        out["peer_timeout_s"] = pipe.placement.peer_timeout_s
        out["rows"] = [None if r is None else [r.sent, r.received] for r in rows]
    except Exception as e:  # the test reads the error line
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        out["trace"] = traceback.format_exc()
        code = 1
    except KeyboardInterrupt:
        out["error"] = "KeyboardInterrupt"
        code = 130
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()  # on a failure too, as the CLI does (cli._run_rank)
    return code


if __name__ == "__main__":
    sys.exit(main())
