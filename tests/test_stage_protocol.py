"""The ``Stage`` protocol's declared capabilities: what each stage declares, the one-line
error a stage missing something gets at construction, and pausing the stage below as a
message."""

import pytest
import torch
from tiny import family

from pipespec_fast import FastPipeline, HFStage, LlamaStage, NGramStage, StageCapabilities
from pipespec_fast.pipespec.messages import PAUSE, RESUME, Sync
from pipespec_fast.pipespec.mirror import Mirror
from pipespec_fast.stages import check_stage, is_model_free

PLAIN = StageCapabilities()


class Bare:
    """A stage of another runtime: the core protocol, with ``capabilities`` to fill in."""

    name, vocab_size, max_len, cache_len, device = "bare", 64, 128, 0, "cpu"

    def __init__(self, capabilities=PLAIN):
        if capabilities is not None:
            self.capabilities = capabilities

    def forward(self, tokens, parents=None, last_n=None): ...

    def rollback(self, length): ...

    def keep_path(self, start, path, num, chain=False): ...


def test_each_stage_declares_what_the_engine_reads():
    (m,) = family(1)
    m.config.eos_token_ids = [7, 9]
    llama = LlamaStage(m, max_len=64)
    n_params = sum(p.numel() for p in m.parameters())
    assert llama.capabilities == StageCapabilities(trees=True, tree_drafts=True,
                                                   eos_token_ids=(7, 9),
                                                   num_params=n_params)
    assert NGramStage(64).capabilities == StageCapabilities(model_free=True, confidence=True,
                                                            clone=True, tree_drafts=True)
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    assert HFStage(hf_model).capabilities == StageCapabilities(
        num_params=sum(p.numel() for p in hf_model.parameters()))  # chains, no eos ids
    assert is_model_free(NGramStage(64)) and not is_model_free(llama)
    for st in (llama, NGramStage(64), Bare()):
        check_stage(st, 0)  # complete: no error


@pytest.mark.parametrize("stage,missing", [
    (Bare(None), "missing capabilities"),
    (Bare({"model_free": True}), "missing capabilities as a StageCapabilities (got dict)"),
    (Bare(StageCapabilities(clone=True)), "missing clone (declares clone=True)"),
    (Bare(StageCapabilities(confidence=True)),
     "missing last_match_len (declares confidence=True), min_confident_match (declares "
     "confidence=True)"),
])
def test_a_stage_missing_something_is_refused_naming_it(stage, missing):
    msg = ("stages[1] 'bare' does not implement the Stage protocol (pipespec_fast.stages.Stage)"
           f": {missing}")
    with pytest.raises(ValueError) as ei:
        check_stage(stage, 1)
    assert str(ei.value) == msg
    (m,) = family(1)
    with pytest.raises(ValueError) as ei:  # at construction, before any generation
        FastPipeline([LlamaStage(m, max_len=128), stage])
    assert str(ei.value) == msg


def test_a_stage_without_forward_or_name():
    class NoForward:
        vocab_size, max_len, cache_len, device = 64, 128, 0, "cpu"
        capabilities = StageCapabilities()

        def rollback(self, length): ...

        def keep_path(self, *a): ...

    with pytest.raises(ValueError, match=r"^stages\[0\] 'NoForward' .*: missing name, forward$"):
        check_stage(NoForward(), 0)


def test_target_eos_ids_are_the_default_after_the_tokenizer():
    (m,) = family(1)
    m.config.eos_token_ids = [7, 9]
    assert FastPipeline([LlamaStage(m, max_len=128)]).eos_token_ids == {7, 9}
    assert FastPipeline([LlamaStage(m, max_len=128)], eos_token_ids=[3]).eos_token_ids == {3}


def test_pausing_the_stage_below_is_a_message_sent_when_the_window_changes():
    from test_inline import build

    _, (low, mid, tgt) = build([LlamaStage(m, max_len=128) for m in family(3)])
    # the stages below the target start paused, their prefill deferred until first resumed
    assert not mid.wanted and not tgt._below_wanted and mid.defer_prefill
    windows = iter([0, 3, 0, 0, 3, 2, 0])
    tgt.s.window = lambda max_n, cost: next(windows)
    tgt.mirror = Mirror([1, 2])  # the target's copy of the stage below's sequence
    tgt.s.span.extend_known([1, 2, 3])  # one token ahead of it
    sent = []
    for _ in range(7):
        tgt._window()
        while not mid.inbox.empty():
            sent.append(mid.inbox.get_nowait())
    # one message per change, none per step; a resume is preceded by what the paused stage
    # missed (a Sync, when anything differs: nothing is sent to it while it is paused)
    assert [m for m in sent if not isinstance(m, Sync)] == [RESUME, PAUSE, RESUME, PAUSE]
    syncs = [i for i, m in enumerate(sent) if isinstance(m, Sync)]
    assert len(syncs) == 2 and all(sent[i + 1] is RESUME for i in syncs)
    assert all((sent[i].start, sent[i].tokens) == (2, [3]) for i in syncs)
    assert low.inbox.empty()
    mid.inbox.put(PAUSE)
    mid._drain(block=False)
    assert not mid.wanted and not mid._lead_ok() and not mid.step()  # it waits
    mid.inbox.put(RESUME)
    mid._drain(block=False)
    assert mid.wanted and mid._lead_ok()


def test_a_sync_past_the_sequence_is_ignored_in_pipespec_and_refused_when_strict():
    """A Sync computed from a stale mirror (the stage below truncated; its Chunk is on the
    way) can begin past the lower stage's sequence: it cannot be adopted, so PipeSpec's
    workers ignore it (a new one follows); the synchronous modes, whose syncs are exact,
    refuse it."""
    from pipespec_fast.decoding.sampling import SamplingParams
    from pipespec_fast.decoding.sequence import Sequencer

    s = Sequencer(LlamaStage(family(1)[0], max_len=64), SamplingParams(), 0)
    s.start([1, 2, 3, 4])
    assert s.apply_sync(6, [9, 9]) is None and s.seq == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="start 6 is past this stage's 4 tokens"):
        s.apply_sync(6, [9, 9], strict=True)
    assert s.apply_sync(4, [5]) == 4 and s.seq == [1, 2, 3, 4, 5]


def test_a_tree_drafter_without_propose_tree_is_refused_where_trees_are_used():
    """Declared but not offered: harmless with chains (a wrapper forwarding a LlamaStage's
    capabilities), refused at construction with ``tree_budget > 0``."""
    class Drafter(Bare):
        device = torch.device("cpu")

    (m,) = family(1, vocab=Bare.vocab_size)
    target = LlamaStage(m, max_len=128)
    drafter = Drafter(StageCapabilities(tree_drafts=True))
    check_stage(drafter, 0)
    FastPipeline([drafter, target], mode="sync")
    with pytest.raises(ValueError, match=r"^tree_budget=4: the lowest stage must draft trees: "
                       r"stages\[0\] 'bare' .*missing propose_tree \(declares tree_drafts=True\)$"):
        FastPipeline([drafter, target], mode="sync", tree_budget=4)
    with pytest.raises(ValueError, match=r"stages\[0\] 'bare' does not draft trees"):
        FastPipeline([Drafter(), target], mode="sync", tree_budget=4)
