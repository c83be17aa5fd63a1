"""End to end on the embedded default model (SmolLM2-135M-Instruct, converted from its GGUF)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target_dir():
    from pipespec_fast.models.defaults import default_target_dir

    return default_target_dir()


@pytest.fixture(scope="module")
def chat_ids(target_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_64_tokens_identical_to_transformers(target_dir, chat_ids):
    import transformers

    from pipespec_fast import FastPipeline

    pipe = FastPipeline.from_pretrained([str(target_dir)], compute="exact")  # default: int8
    model = pipe.stages[-1].model  # every matrix held only in its GGUF blocks
    assert all(p.is_meta for name, p in model.named_parameters() if "norm" not in name)
    assert model.packed_bytes() < 100 * 2**20
    ours = pipe.generate(chat_ids, 64)
    hm = transformers.LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    with torch.no_grad():  # stops at EOS like ours; this prompt gives a long answer (> 48)
        out = hm.generate(torch.tensor([chat_ids]), max_new_tokens=64, do_sample=False)
    want = out[0, len(chat_ids):].tolist()
    assert len(want) > 48
    assert ours.token_ids == want
    assert "def" in ours.text


def test_greedy_identical_to_transformers_on_more_prompts(target_dir):
    """The exact mode after the fused layers' vectorised softmax and SiLU: greedy equals
    transformers' on three more chat prompts (code, explanation, arithmetic), 48 tokens each."""
    import transformers
    from transformers import AutoTokenizer

    from pipespec_fast import FastPipeline

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    pipe = FastPipeline.from_pretrained([str(target_dir)], compute="exact")
    hm = transformers.LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    for text in ("Write a Python function that merges two sorted lists.",
                 "Explain what a hash table is in two sentences.",
                 "A train travels 60 km in 45 minutes. What is its speed in km/h?"):
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            out = hm.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
        assert pipe.generate(ids, 48).token_ids == out[0, len(ids):].tolist(), text


@pytest.mark.parametrize("compute", ["exact", "int8"])
def test_long_prefill_equals_blocks_of_64_on_the_default_target(target_dir, compute):
    """A 200-token prompt prefilled in one block (the packed GEMM's panel path; int8: the int8
    GEMM's many-row path), then decoded, gives the logits and cache of the same tokens fed in
    blocks of at most 64 (and of 1), bit for bit, on the real Q4_1 / Q8_0 weights, with 2
    threads (every product, the attention and the per-row steps split between them)."""
    from pipespec_fast.cpu import linear
    from pipespec_fast.models.llama import Transformer
    from pipespec_fast.models.packed import set_compute

    m = Transformer.from_pretrained(target_dir)
    set_compute(m, compute)
    ids = torch.randint(0, m.config.vocab_size, (206,),
                        generator=torch.Generator().manual_seed(0))
    old = linear.set_threads(2)
    try:
        runs = []
        for blocks in ([200, 1, 1, 1, 1, 1, 1], [64, 64, 64, 8, 6], [1] * 30 + [40, 64, 64, 8]):
            c, outs, at = m.new_cache(256), [], 0
            for b in blocks:
                outs.append(m(ids[at : at + b], c))
                at += b
            runs.append((torch.cat(outs), c.k[:, :, :206].clone()))
    finally:
        linear.set_threads(old)
    for logits, keys in runs[1:]:
        assert torch.equal(logits, runs[0][0]) and torch.equal(keys, runs[0][1])


def test_cli_generate_streams_text_and_prints_speed(capsys):
    """In each compute mode. (The int8 default answers this France question with "L'Étoile..."
    instead of "The capital of France is Paris.": the first token is a near-tie, log-probs
    -1.88 / -1.97 in exact mode, which int8's rounding flips; hence another question there.)"""
    from pipespec_fast.cli import main

    assert main(["generate", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--mode", "ar", "--compute", "exact"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "tokens/s" in out.strip().splitlines()[-1]
    assert main(["generate", "--prompt", "What is 2+2?", "--max-new-tokens", "12",
                 "--mode", "ar"]) == 0
    out = capsys.readouterr().out
    assert "is 4" in out
    assert "tokens/s" in out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def default_pipe():
    from pipespec_fast import FastPipeline

    with FastPipeline.from_default(draft=True) as pipe:  # the whole hierarchy, any machine
        yield pipe


def test_default_hierarchy_streams_the_targets_greedy_text(default_pipe, chat_ids):
    from pipespec_fast import FastPipeline

    names = [s.name for s in default_pipe.stages]
    assert names == ["ngram", "SmolLM2-135M-draft", default_pipe.stages[-1].name]
    # the default compute mode: int8 for the Q4_1 / Q8_0 target, and the fp16 draft follows
    assert [s.model.compute for s in default_pipe.stages[1:]] == ["int8", "int8"]
    assert default_pipe.stages[1].model.config.vocab_subset == 12288
    pieces = list(default_pipe.stream(chat_ids, 48))
    res = default_pipe.last_result
    assert "".join(pieces) == res.text and len(pieces) > 1
    alone = FastPipeline([default_pipe.stages[-1]], tokenizer=default_pipe.tokenizer)
    assert res.token_ids == alone.generate(chat_ids, 48).token_ids
    assert res.stage_stats[-1].verify_steps > 0
    # with fixed windows (the adaptive ones may switch speculation off where it does not pay,
    # as on a 2-core CPU), the distilled draft's tokens are checked by the target and often
    # accepted (an untrained 3-layer draft gets about 3% of them right)
    default_pipe.adaptive_windows = False
    try:
        fixed = default_pipe.generate(chat_ids, 48)
    finally:
        default_pipe.adaptive_windows = True
    assert fixed.token_ids == res.token_ids
    target = fixed.stage_stats[-1]
    assert target.proposed > 0 and target.accepted / target.proposed > 0.15
    pred = default_pipe.predict()
    assert pred.pipespec_tokens_per_s > 0 and pred.ar_tokens_per_s > 0


def test_default_hierarchy_samples_in_both_speculative_modes(default_pipe, chat_ids):
    """Fixed windows: the adaptive policy may rightly decide, on a loaded machine, that the
    target decodes alone, and then no draft is verified (a timing-dependent outcome)."""
    from pipespec_fast import FastPipeline

    pipe = FastPipeline(default_pipe.stages, tokenizer=default_pipe.tokenizer,
                        adaptive_windows=False)
    for mode in ("pipespec", "sync"):
        res = pipe.generate(chat_ids, 32, temperature=0.7, seed=3, mode=mode, ignore_eos=True)
        assert len(res.token_ids) == 32 and res.stage_stats[-1].accepted > 0


def test_stop_string_ends_generation_and_is_not_returned(default_pipe, chat_ids):
    full = default_pipe.generate(chat_ids, 48, ignore_eos=True)
    assert "\n" in full.text
    res = default_pipe.generate(chat_ids, 48, ignore_eos=True, stop="\n")
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index("\n")]
    assert res.token_ids == full.token_ids[: len(res.token_ids)]


def test_text_prompt_and_sampling_on_the_default(default_pipe):
    a = default_pipe.generate("Name three colours.", 16, temperature=0.8, top_k=50, seed=7)
    b = default_pipe.generate("Name three colours.", 16, temperature=0.8, top_k=50, seed=7,
                              mode="sync")
    assert a.text and b.text and len(a.token_ids) <= 16
    with pytest.raises(ValueError, match="top_p"):
        default_pipe.generate("x", 4, top_p=2.0)


def test_default_without_draft_is_ngram_then_target(chat_ids):
    from pipespec_fast import FastPipeline
    from pipespec_fast.cli import main

    with FastPipeline.from_default(draft=False) as pipe:
        assert [s.name for s in pipe.stages][0] == "ngram" and len(pipe.stages) == 2
        alone = FastPipeline([pipe.stages[-1]], tokenizer=pipe.tokenizer)
        assert pipe.generate(chat_ids, 24).token_ids == alone.generate(chat_ids, 24).token_ids
    assert main(["generate", "--prompt", "Say hi.", "--max-new-tokens", "4", "--no-draft"]) == 0


@pytest.mark.parametrize("compute", ["exact", "int8"])
def test_default_hierarchy_equals_its_own_ar_in_each_compute_mode(chat_ids, compute):
    """The default hierarchy in each compute mode asked for by name: greedy pipespec and sync
    output equal the same pipeline's AR in that mode, token for token."""
    from pipespec_fast import FastPipeline

    with FastPipeline.from_default(draft=True, compute=compute) as pipe:
        assert all(s.model.compute == compute for s in pipe.stages if hasattr(s, "model"))
        want = pipe.generate(chat_ids, 64, mode="ar", ignore_eos=True).token_ids
        for mode in ("pipespec", "sync"):
            assert pipe.generate(chat_ids, 64, mode=mode, ignore_eos=True).token_ids == want


def test_trees_on_the_default_hierarchy_equal_the_targets_greedy(default_pipe, chat_ids):
    """n-gram token trees on the default models, k = 2 and 3, sync and pipespec, fixed windows
    (every step verifies a tree): greedy output equal to the target alone, trees verified."""
    from pipespec_fast import FastPipeline

    stages = default_pipe.stages
    want = FastPipeline(stages[-1:]).generate(chat_ids, 96, ignore_eos=True).token_ids
    trees = 0
    for hierarchy in ([stages[0], stages[-1]], stages):
        pipe = FastPipeline(hierarchy, adaptive_windows=False, tree_budget=12)
        for mode in ("sync", "pipespec"):
            res = pipe.generate(chat_ids, 96, ignore_eos=True, mode=mode)
            assert res.token_ids == want, (len(hierarchy), mode)
            trees += sum(s.tree_steps for s in res.stage_stats)
    assert trees > 0
