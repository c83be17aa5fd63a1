"""Host reads per step, counted on the CPU: on CUDA every read of a tensor's value on the host
is a synchronisation, so the engine reads once per verify step (its result ints) and once per
drafter's run of tokens (the run's ids), never per drafted token.

The CPU has no synchronisation to observe, so these tests count the reads themselves: every
``tolist`` / ``item`` / ``int`` / ``bool`` / ``float`` / ``index`` of a tensor, by the module
that makes it. ``StageDevice.deferred_reads`` (on by default on CUDA) is turned on to run the
code path CUDA runs. The acceptance kernels' CPU reference reads its inputs on the host (on a
GPU, the Triton kernels run instead), so reads are counted in the engine's own modules
(``decoding``, ``pipespec``, ``stages``), where each one would be a sync on any device.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast import ops as kv_ops
from pipespec_fast.decoding import warm_up as warm
from pipespec_fast.decoding.device import StageDevice
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.tree_step import verify_tree
from pipespec_fast.stages.tree import DraftTree

READS = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__")
ENGINE = ("/pipespec_fast/decoding/", "/pipespec_fast/pipespec/", "/pipespec_fast/stages/")
# greedy; top-k sampling (torch's ops); plain temperature (on CPU, C's: cpu/sample.py)
PARAMS = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=3),
          SamplingParams(temperature=0.8, seed=3)]
IDS = ["greedy", "top-k", "sampled"]
PROMPT = [1, 5, 9, 2, 7, 3]


@contextlib.contextmanager
def counted_reads():
    """Counts tensor reads by the calling file (``Counter[(file, line)]``)."""
    counts: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, f):
        def read(self, *a, **kw):
            caller = traceback.extract_stack(limit=3)[-2]
            counts[(caller.filename, caller.lineno)] += 1
            return f(self, *a, **kw)
        return read

    for name, f in saved.items():
        setattr(torch.Tensor, name, wrap(name, f))
    try:
        yield counts
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def engine_read_sites(counts) -> list[str]:
    """The engine modules' files among the counted reads."""
    return [f for f, _ in counts if any(part in f.replace("\\", "/") for part in ENGINE)]


def counted_device(seqr: Sequencer) -> list:
    """Turn on deferred reads and log the step-level reads (``read`` / ``to_host``)."""
    calls: list = []
    dev = seqr.dev
    dev.deferred_reads = True
    read, to_host = dev.read, dev.to_host
    dev.read = lambda *parts: (calls.append("read"), read(*parts))[1]
    dev.to_host = lambda *parts: (calls.append("to_host"), to_host(*parts))[1]
    return calls


def _sequencer(params, deferred: bool, model=None) -> Sequencer:
    s = Sequencer(LlamaStage(model or family(2)[0]), params, index=0)
    s.dev.deferred_reads = deferred
    s.start(PROMPT)
    return s


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_a_draft_run_reads_once_and_draws_what_token_by_token_drawing_draws(params):
    one_by_one = _sequencer(params, deferred=False)
    one_by_one.draft(5)
    run = _sequencer(params, deferred=False)
    calls = counted_device(run)
    with counted_reads() as counts:
        run.draft(5)
    assert run.seq == one_by_one.seq and len(run.seq) == len(PROMPT) + 5
    assert calls == ["read"]  # one host sync for the five tokens
    assert sum(counts.values()) == 1 and all(f.endswith("device.py") for f, _ in counts)
    for a, b in zip(run.span.rows, one_by_one.span.rows, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert run.sampler.rng_offset == one_by_one.sampler.rng_offset
    assert run.stage.cache_len == one_by_one.stage.cache_len == len(run.seq) - 1
    assert run.stats.drafted == 5 and run.draft_cost_s is not None


def test_a_draft_run_refuses_a_non_finite_row_with_the_stage_named():
    s = _sequencer(SamplingParams(), deferred=True)
    stage = s.stage
    forward = stage.forward
    calls = []

    def poisoned(ids, parents=None, last_n=None):
        out = forward(ids, parents=parents, last_n=last_n)
        calls.append(1)
        return torch.full_like(out, float("nan")) if len(calls) == 3 else out

    stage.forward = poisoned
    with pytest.raises(Exception, match="non-finite") as e:
        s.draft(4)
    assert "0 (" in str(e.value) and len(s.seq) == len(PROMPT)  # nothing committed
    assert stage.cache_len == len(PROMPT) - 1  # ... nor cached: the invariant holds


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_a_chain_verify_reads_once(params):
    d, t = family(2)
    s = _sequencer(params, deferred=True, model=t)
    calls = counted_device(s)
    rows = None if params.greedy else [torch.full((t.config.vocab_size,), 1 / 64)] * 3
    with counted_reads() as counts:
        s.verify([7, 8, 9], rows)
    assert calls == ["to_host"]
    sites = engine_read_sites(counts)
    assert sites and all(f.endswith("device.py") for f in sites)


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_a_step_without_drafts_reads_once_through_the_stage_device(params):
    """An autoregressive step (and a verifier's step alone) reads its token with the event
    wait of ``StageDevice.read``, not a synchronising ``.tolist()`` of a device tensor."""
    ref = _sequencer(params, deferred=False)
    ref.verify([], None)
    s = _sequencer(params, deferred=True)
    calls = counted_device(s)
    with counted_reads() as counts:
        s.verify([], None)
    assert calls == ["read"] and s.seq == ref.seq
    sites = engine_read_sites(counts)
    assert sites and all(f.endswith("device.py") for f in sites)


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_a_tree_verify_reads_once_path_included(params):
    """The accepted path's node ids come with the step's result ints (they decide the KV
    compaction and the committed tokens): one read, where there used to be two."""
    d, t = family(2)
    s = _sequencer(params, deferred=True, model=t)
    calls = counted_device(s)
    tree = DraftTree(tokens=(7, 9, 8, 3), parents=(-1, -1, 0, 0), weights=(1.0, 0.5, 0.5, 0.3))
    ref = _sequencer(params, deferred=False, model=t)
    with counted_reads() as counts:
        num = verify_tree(s, tree)
    assert calls == ["read"]
    sites = engine_read_sites(counts)
    assert sites and all(f.endswith("device.py") for f in sites)
    assert verify_tree(ref, tree) == num and ref.seq == s.seq


@pytest.mark.parametrize("k", [2, 3])
def test_pipespec_with_deferred_reads_equals_autoregressive(monkeypatch, k):
    """Every stage as on CUDA: model drafters draft runs of up to ``StageWorker.DRAFT_RUN``
    tokens with one read each; greedy output stays the target's own."""
    models = family(k, noise=0.05, seed=4)
    ref = FastPipeline([LlamaStage(models[-1])]).generate(PROMPT, 60, ignore_eos=True)
    init = StageDevice.__init__

    def deferred(self, device):
        init(self, device)
        self.deferred_reads = True

    monkeypatch.setattr(StageDevice, "__init__", deferred)
    stages = [LlamaStage(m) for m in models]
    for mode in ("pipespec", "sync"):
        res = FastPipeline(stages, mode=mode, adaptive_windows=False).generate(
            PROMPT, 60, ignore_eos=True)
        assert res.token_ids == ref.token_ids
        assert res.stage_stats[0].drafted > 0 and res.stage_stats[-1].accepted > 0


def test_warm_up_rehearses_and_leaves_the_stage_as_it_was(monkeypatch):
    models = family(2, noise=0.05, seed=4)
    stages = [LlamaStage(m) for m in models]
    ref = FastPipeline(stages, adaptive_windows=False).generate(PROMPT, 40, ignore_eos=True)
    fresh = [LlamaStage(m) for m in models]
    forwards = []
    for st in fresh:
        f = st.forward
        st.forward = lambda ids, parents=None, last_n=None, f=f: (
            forwards.append((ids.shape[0], parents is not None)), f(ids, parents, last_n))[1]
    compactions = []
    compact = kv_ops.kv_compact
    monkeypatch.setattr(kv_ops, "kv_compact", lambda *a: (compactions.append(1), compact(*a)))
    pipe = FastPipeline(fresh, adaptive_windows=False, warm_up=True)
    assert all(st.cache_len == 0 for st in fresh) and len(compactions) >= len(fresh)
    # a prefill past the split threshold, chains and trees of each acceptance block size
    assert max(n for n, _ in forwards) > warm.SPLIT_KEYS
    assert {n for n, tree in forwards if tree} >= {3 + 1, 17 + 1, 33 + 1}
    assert {n for n, tree in forwards if not tree} >= {1 + 1, 17 + 1, 33 + 2}
    assert pipe.generate(PROMPT, 40, ignore_eos=True).token_ids == ref.token_ids


def test_warm_up_runs_by_default_on_cuda_stages_only(monkeypatch):
    ran = []
    monkeypatch.setattr(warm, "warm_up", lambda st: ran.append(st))
    stages = [LlamaStage(m) for m in family(2)]
    FastPipeline(stages)
    assert ran == []  # the CPU compiles nothing at run time
    FastPipeline(stages, warm_up=True)
    assert ran == stages
    assert not warm.should_warm_up(stages[0], None)
    assert warm.should_warm_up(stages[0], True)
    with pytest.raises(ValueError, match="^warm_up: "):
        FastPipeline(stages, warm_up="yes")


@pytest.mark.parametrize("max_len", [16, 40, 100])
def test_warm_up_on_a_short_cache_rehearses_what_fits(max_len):
    """A stage built with a small cache is warmed up within it (a generation on it cannot
    run larger steps either), never refused."""
    st = LlamaStage(family(1)[0], max_len=max_len)
    sizes = []
    f = st.forward
    st.forward = lambda ids, parents=None, last_n=None: (sizes.append(ids.shape[0]),
                                                         f(ids, parents, last_n))[1]
    warm.warm_up(st)
    assert st.cache_len == 0 and sizes and max(sizes) < max_len
    assert (17 + 1 in sizes) == (max_len >= 100)


def test_warm_up_knows_the_kernels_split_threshold():
    """The rehearsal's long prompt must pass the attention's split threshold, which it keeps
    as its own constant (importing the kernels would import Triton with the engine)."""
    from pipespec_fast.kernels.verify_attention import MIN_SPLIT_KEYS

    assert warm.SPLIT_KEYS == MIN_SPLIT_KEYS
