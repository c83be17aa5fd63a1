"""The distributed placement (one process per model stage, gloo on loopback): greedy output
identical to the single-process pipeline, failures that end every rank with an error naming
the stage, and no process left behind.

Each rank is a subprocess running ``tests/dist_child.py``; every run is bounded in time (the
ranks are killed and the test fails past ``RUN_TIMEOUT_S``)."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import family, hf_state_of

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.models.checkpoint import save_state_dict
from pipespec_fast.pipespec import wire
from pipespec_fast.pipespec.messages import Chunk, Sync, Wanted
from pipespec_fast.pipespec.placement import PEER_TIMEOUT_S

CHILD = Path(__file__).with_name("dist_child.py")
RUN_TIMEOUT_S = 120
PROMPTS = [[1, 5, 7, 9, 3, 11], [2], list(range(3, 40))]
N = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _family_dirs(tmp_path: Path, k: int, seed: int, words: list[str] | None = None
                 ) -> tuple[list[str], list]:
    """A tiny family's checkpoint folders (with a word-level tokenizer over ``words``)."""
    models = family(k, noise=0.05, seed=seed)
    dirs = []
    for i, m in enumerate(models):
        d = tmp_path / f"m{i}"
        if words is None:
            save_state_dict(d, hf_state_of(m), m.config)
        else:
            from tiny import write_tiny_checkpoint

            write_tiny_checkpoint(d, m, words)
        dirs.append(str(d))
    return dirs, models


def _run_ranks(tmp_path: Path, world: int, spec: dict, env: dict | None = None,
               hung: tuple[int, ...] = ()) -> tuple[list[int], list[dict], dict]:
    """Start ``world`` ranks on ``spec`` (with ``env`` added to their environment); wait for
    all but the ``hung`` ones, then kill whatever is left (all of them past the timeout).
    Returns each rank's exit code and JSON output, and when each exited (monotonic)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = dict(spec, out=str(out))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(CHILD), str(r), str(world), str(port),
                               str(spec_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
             for r in range(world)]
    ended: dict[int, float] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while len(ended) < world - len(hung) and time.monotonic() < deadline:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.monotonic()
            time.sleep(0.02)
    finally:
        for p in procs:  # nothing left behind, whatever happened
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [p.stdout.read().decode(errors="replace") for p in procs]
    assert len(ended) == world - len(hung), f"ranks still running after {RUN_TIMEOUT_S} s:\n" + \
        "\n".join(logs)
    results = []
    for r in range(world):
        f = out / f"rank{r}.json"
        results.append({**(json.loads(f.read_text()) if f.exists() else {}), "log": logs[r]})
    return [p.returncode for p in procs], results, ended


def _reference(models, prompts) -> list[list[int]]:
    target = FastPipeline([LlamaStage(models[-1], max_len=256)])
    return [target.generate(p, N, ignore_eos=True).token_ids for p in prompts]


@pytest.mark.parametrize("k,ngram,rows", [(2, False, "auto"), (3, False, "auto"),
                                          (2, True, "auto"), (3, True, "auto"),
                                          (3, "store", "auto"), (3, False, "split")])
def test_greedy_output_identical_to_the_single_process_pipeline(tmp_path, k, ngram, rows):
    """``rows="split"``: every link has a gloo group of its own for rows (none under greedy),
    made and connected at start-up as NCCL's would be; its ranks are also given a peer
    timeout (``PIPESPEC_DIST_PEER_TIMEOUT``), which every rank's links take. ``"store"``: the
    n-gram drafter with a store of the target's own answers (loaded by ranks 0 and 2)."""
    dirs, models = _family_dirs(tmp_path, k, seed=k + 3 * bool(ngram))
    want = _reference(models, PROMPTS)
    spec = {"dirs": dirs, "prompts": PROMPTS, "n": N, "ngram": bool(ngram)}
    if ngram == "store":
        from pipespec_fast.stages.ngram_store import NGramStore

        spec["ngram_store"] = str(NGramStore(want, models[-1].config.vocab_size)
                                  .save(tmp_path / "store"))
    timeout = "7.5" if rows == "split" else ""  # empty: the default
    codes, results, _ = _run_ranks(tmp_path, k, spec,
                                   env={"PIPESPEC_DIST_ROWS": rows,
                                        "PIPESPEC_DIST_PEER_TIMEOUT": timeout})
    assert codes == [0] * k, results
    assert [r["peer_timeout_s"] for r in results] == [float(timeout or PEER_TIMEOUT_S)] * k
    route = "split" if rows == "split" else "inline"
    assert results[1]["routes"] == [route] * (k - 1)  # the middle rank (or the target) sees all
    assert results[0]["routes"][0] == route and results[-1]["routes"][-1] == route
    for r in results:  # every rank returns the target's tokens
        assert r["results"] == want
    target = results[-1]["stats"][-1]
    assert target["proposed"] > 0 and 0 < target["accepted"] < target["proposed"]
    if ngram:  # rank 0 runs the n-gram drafter inline: two stages there
        assert [s["name"] for s in results[0]["stats"]][0] == "ngram"
    # the drafters of ranks 0 and k - 1 read the store; no other rank loads it
    assert [r["has_store"] for r in results] == [ngram == "store", *[False] * (k - 2),
                                                 ngram == "store"]


@pytest.mark.slow
def test_default_models_on_two_ranks_give_the_single_process_greedy_output(tmp_path):
    """The default hierarchy ``[n-gram -> draft -> target]`` as two ranks (the n-gram inline
    on rank 0, its copy on the target's rank) against the same pipeline in one process."""
    from pipespec_fast.models.defaults import default_model_dirs

    pipe = FastPipeline.from_default(draft=True)  # as the ranks load it
    prompts = [pipe.chat_prompt("Write a Python function that checks whether a number is "
                                "prime."), pipe.chat_prompt("Name three colours.")]
    want = [pipe.generate(p, 48, ignore_eos=True).token_ids for p in prompts]
    pipe.close()
    dirs = [str(d) for d in default_model_dirs()]
    codes, results, _ = _run_ranks(tmp_path, 2, {"dirs": dirs, "prompts": prompts, "n": 48,
                                                 "ngram": True, "adaptive": True})
    assert codes == [0, 0], results
    assert results[0]["results"] == want and results[1]["results"] == want


@pytest.mark.parametrize("rows", ["auto", "split"])
def test_sampling_on_two_ranks_follows_the_target_distribution(tmp_path, rows):
    """k = 2 across processes (the drafts' rows cross the wire): the joint distribution of
    the first two sampled tokens is the target's own (chi-square, as tests/test_pipeline.py
    does in one process). ``rows="split"``: the rows travel on a gloo group of their own,
    after the header that announces them on the control group: the NCCL route's path, with
    gloo standing in for NCCL."""
    from scipy.stats import chisquare
    from test_pipeline import exact_joint

    models = family(2, noise=0.6, seed=23, vocab=6)
    dirs = []
    for i, m in enumerate(models):
        save_state_dict(tmp_path / f"m{i}", hf_state_of(m), m.config)
        dirs.append(str(tmp_path / f"m{i}"))
    prompt, n = [1, 5, 2, 3, 0, 4], 1000
    joint = exact_joint(LlamaStage(models[-1], max_len=64), prompt, 1.0, None, None)
    codes, results, _ = _run_ranks(tmp_path, 2, {"dirs": dirs, "prompts": [prompt], "n": 2,
                                                 "seeds": list(range(n)), "adaptive": True,
                                                 "sampling": {"temperature": 1.0}},
                                   env={"PIPESPEC_DIST_ROWS": rows})
    assert codes == [0, 0], results
    assert results[0]["results"] == results[1]["results"]
    assert results[1]["accepted"] > 0  # drafts (and their rows) were really used
    route = "split" if rows == "split" else "inline"
    assert results[0]["routes"] == results[1]["routes"] == [route]
    sent, received = results[0]["rows"][0][0], results[1]["rows"][0][1]
    assert sent > 0 and received == sent  # every row went up on the route, none came down
    assert results[0]["rows"][0][1] == results[1]["rows"][0][0] == 0
    V = joint.shape[0]
    counts = torch.zeros(V * V, dtype=torch.float64)
    for a, b in results[1]["results"]:
        counts[a * V + b] += 1
    exp = joint.flatten() * n
    keep = exp > 0
    assert counts[~keep].sum() == 0
    order = torch.argsort(exp[keep])
    obs_k, exp_k = counts[keep][order], exp[keep][order]
    rare = exp_k.cumsum(0) < 10  # pool rare cells so every expected count is >= 5
    obs = torch.cat([obs_k[~rare], obs_k[rare].sum().reshape(1)])
    ex = torch.cat([exp_k[~rare], exp_k[rare].sum().reshape(1)])
    p = chisquare(obs.numpy(), (ex * obs.sum() / ex.sum()).numpy()).pvalue
    assert p > 1e-3, p


def _hosts(tmp_path: Path, k: int, seed: int, words: list[list[str]]
           ) -> tuple[list[list[str]], list]:
    """Rank i's list of the ``k`` folders on "host" i, where only folder i exists (with a
    word-level tokenizer over ``words[i]``): ranks on hosts that hold only their own model."""
    models = family(k, noise=0.05, seed=seed)
    lists = []
    for i, m in enumerate(models):
        from tiny import write_tiny_checkpoint

        host = tmp_path / f"host{i}"
        write_tiny_checkpoint(host / f"m{i}", m, words[i])
        lists.append([str(host / f"m{j}") for j in range(k)])
    return lists, models


WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]


def test_each_rank_reads_only_its_own_model_folder(tmp_path):
    """Rank i is given k paths of which only the i-th exists on its "host": it loads its
    model and its tokenizer from there, the ranks compare tokenizers by digest, and the output
    is the single-process pipeline's."""
    lists, models = _hosts(tmp_path, 2, seed=17, words=[WORDS, WORDS])
    want = _reference(models, PROMPTS[:1])
    codes, results, _ = _run_ranks(tmp_path, 2, {"dirs_by_rank": lists, "prompts": PROMPTS[:1],
                                                 "n": N})
    assert codes == [0, 0], results
    assert results[0]["results"] == results[1]["results"] == want


@pytest.mark.parametrize("broken", ["missing", "vocab"])
def test_a_rank_that_cannot_read_its_folder_ends_every_rank_naming_it(tmp_path, broken):
    """Rank 0's folder is missing on its host, or holds another vocabulary: both ranks raise
    at once (no rank left waiting in a collective), naming the rank or both stages."""
    other = ["<unk>"] + [f"v{i}" for i in range(63)]  # the same size, another vocabulary
    lists, _ = _hosts(tmp_path, 2, seed=18, words=[other if broken == "vocab" else WORDS,
                                                    WORDS])
    if broken == "missing":
        lists[0][0] = str(tmp_path / "host0" / "gone")
    codes, results, _ = _run_ranks(tmp_path, 2, {"dirs_by_rank": lists, "prompts": PROMPTS[:1],
                                                 "n": N})
    assert codes == [1, 1], results
    if broken == "missing":
        assert results[0]["error"] == f"ValueError: {lists[0][0]}: no such model folder on " \
            "this host"
        assert results[1]["error"] == ("RankUsageError: distributed: rank 0 failed reading its "
                                       f"model folder (ValueError: {lists[0][0]}: no such "
                                       "model folder on this host)")
    else:
        for r in results:
            assert r["error"] == ("ValueError: tokenizer vocab mismatch between stage 'm0' and "
                                  "target 'm1': all stages must share one tokenizer")


def test_a_stage_that_raises_ends_every_rank_with_an_error_naming_it(tmp_path):
    dirs, _ = _family_dirs(tmp_path, 3, seed=11)
    codes, results, _ = _run_ranks(tmp_path, 3, {"dirs": dirs, "prompts": PROMPTS[:1],
                                                 "n": N, "raise_rank": 1, "after": 6})
    assert codes == [1, 1, 1], results
    for r in results:
        assert r["error"].startswith("StageError: stage 1 (m1) on rank 1 failed"), r["error"]
        assert "injected failure" in r["error"]


@pytest.mark.parametrize("killed", [0, 1])
def test_a_rank_killed_mid_generation_ends_the_others_within_5_s(tmp_path, killed):
    dirs, _ = _family_dirs(tmp_path, 3, seed=12)
    codes, results, ended = _run_ranks(tmp_path, 3, {"dirs": dirs, "prompts": PROMPTS[:1],
                                                     "n": 200, "kill_rank": killed,
                                                     "after": 8})
    assert codes[killed] == -9
    others = [r for r in range(3) if r != killed]
    assert all(codes[r] == 1 for r in others), results
    for r in others:
        assert ended[r] - ended[killed] < 5.0
        assert f"on rank {killed}" in results[r]["error"], results[r]["error"]
        assert "died or stopped answering" in results[r]["error"]


@pytest.mark.parametrize("stopped", [0, 2])
def test_a_hung_rank_is_named_by_every_other_rank(tmp_path, stopped):
    """A rank that stops answering (SIGSTOP: alive, its sockets open, silent) at one end of 3:
    its neighbour's receive times out, and both other ranks exit naming the hung rank, not
    the neighbour that saw its link to the hung one close (each link has a gloo group of its
    own: a timeout closes only that link's connections)."""
    dirs, _ = _family_dirs(tmp_path, 3, seed=14)
    codes, results, ended = _run_ranks(tmp_path, 3, {"dirs": dirs, "prompts": PROMPTS[:1],
                                                     "n": 200, "stop_rank": stopped,
                                                     "after": 8}, hung=(stopped,))
    assert (tmp_path / "out" / f"stopped{stopped}.txt").exists(), results
    stop_time = float((tmp_path / "out" / f"stopped{stopped}.txt").read_text())
    others = [r for r in range(3) if r != stopped]
    assert codes[stopped] == -9 and all(codes[r] == 1 for r in others), results
    for r in others:
        assert ended[r] - stop_time < PEER_TIMEOUT_S + 5.0
        assert results[r]["error"].startswith(f"StageError: stage {stopped} (m{stopped})"
                                              f" on rank {stopped} failed"), results[r]["error"]
        assert "stopped answering" in results[r]["error"], results[r]["error"]
        assert ".cc:" not in results[r]["error"] and "GLHF" not in results[r]["error"]


def test_a_rank_interrupted_mid_generation_ends_the_others_naming_it(tmp_path):
    """Ctrl-C reaching one rank only (its host's launcher, say): that rank stops with
    KeyboardInterrupt, and tells the others why before it exits."""
    dirs, _ = _family_dirs(tmp_path, 3, seed=13)
    codes, results, ended = _run_ranks(tmp_path, 3, {"dirs": dirs, "prompts": PROMPTS[:1],
                                                     "n": 200, "interrupt_rank": 1,
                                                     "after": 8})
    assert codes == [1, 130, 1], results
    assert results[1]["error"] == "KeyboardInterrupt"
    for r in (0, 2):
        assert ended[r] - ended[1] < 5.0
        assert results[r]["error"] == ("StageError: stage 1 (m1) on rank 1 failed: "
                                       "RemoteStageError: interrupted (KeyboardInterrupt: "
                                       "Ctrl-C or SIGINT)"), results[r]["error"]


def test_cli_under_torchrun_prints_the_single_process_answer(tmp_path):
    """``torchrun --standalone --nproc-per-node 3 -m pipespec_fast generate --distributed``:
    the target's rank prints the text the single-process CLI prints, the others nothing."""
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    dirs, _ = _family_dirs(tmp_path, 3, seed=41, words=words)
    args = ["generate", "--models", *dirs, "--prompt", "w1 w5 w7", "--max-new-tokens", "16",
            "--ignore-eos", "--max-len", "128"]
    one = subprocess.run([sys.executable, "-m", "pipespec_fast", *args], capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S)
    assert one.returncode == 0, one.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "3", "-m", "pipespec_fast", *args,
                          "--distributed"], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    answer = one.stdout.strip().splitlines()[0]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == answer and len(answer.split()) == 16
    assert lines[-1].startswith("[pipespec, 3 ranks: m0 on rank 0 -> m1 on rank 1 -> m2 on "
                                "rank 2] 16 tokens")
    assert re.search(r"tokens/s, acceptance m2 \d+%$", lines[-1]), lines[-1]
    assert len(lines) == 2


def test_two_launchers_as_two_hosts_each_with_its_own_folder(tmp_path):
    """The multi-host command of the README, on loopback: two ``torchrun`` launchers (``--nnodes
    2 --node-rank N --rdzv-endpoint``, the static rendezvous: global rank = node rank), each
    given the same ``--models`` list of which only its own folder exists on its "host". The
    target's node prints the single-process CLI's answer."""
    lists, _ = _hosts(tmp_path, 2, seed=44, words=[WORDS, WORDS])
    args = ["generate", "--prompt", "w1 w5 w7", "--max-new-tokens", "12", "--ignore-eos",
            "--max-len", "128"]
    one = subprocess.run([sys.executable, "-m", "pipespec_fast", *args, "--models",
                          lists[0][0], lists[1][1]], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--node-rank", str(n),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "pipespec_fast",
                               *args, "--distributed", "--models", *lists[n]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    try:
        outs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:  # nothing left behind: torchrun ends its rank on SIGTERM
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            p.wait()
    assert [p.returncode for p in nodes] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == ""  # the draft's node prints nothing
    lines = outs[1][0].strip().splitlines()
    assert lines[0] == one.stdout.strip().splitlines()[0]
    assert lines[-1].startswith("[pipespec, 2 ranks:")


# ----------------------------------------------------------------------------- wire format


def test_messages_survive_the_wire_format_bit_for_bit():
    rows = torch.softmax(torch.randn(2, 7, dtype=torch.float32), -1)
    span = TokenSpan([3, 2**39 + 5, 6], [None, rows[0], rows[1]], [True, True, False])
    for msg in (Chunk(4, span), Chunk(0, TokenSpan([])), Sync(9, [1, 2]), Sync(3, []),
                Wanted(False), Wanted(True), wire.Finish([5, 6]), wire.END, wire.HEARTBEAT,
                wire.Fail("1 (draft) on rank 1", "RuntimeError: boom ü")):
        control, rows = wire.encode(msg)
        shapes, row_shapes = wire.payload_shapes(control[0])
        assert [(tuple(t.shape), t.dtype) for t in control[1:]] == shapes
        assert [(tuple(t.shape), t.dtype) for t in rows] == row_shapes
        got = wire.decode(control[0], control[1:], rows)
        if isinstance(msg, Chunk):
            assert got.start == msg.start and got.span.tokens == msg.span.tokens
            assert got.span.confident == msg.span.confident
            for a, b in zip(got.span.rows, msg.span.rows, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
        else:
            assert got == msg
    # a point-mass marker (a model-free drafter's row) never crosses processes: refused
    from pipespec_fast.decoding.sampling import POINT_MASS
    with pytest.raises(ValueError, match="point-mass"):
        wire.encode(Chunk(0, TokenSpan([3, 4], [span.rows[1], POINT_MASS], [True, True])))

