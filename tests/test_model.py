"""Our LLaMA against transformers' LlamaForCausalLM, and cache behaviour."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pipespec_fast import reference
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.llama import Transformer

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_pair(n_heads, n_kv, tie, scaling, layers=3, dim=48, vocab=101, seed=0):
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, intermediate_size=2 * dim,
        tie_word_embeddings=tie, rope_scaling=scaling, rope_theta=500.0,
        max_position_embeddings=256, rms_norm_eps=1e-5)
    hm = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.normal_(0, 0.2)
    cfg = LlamaConfig.from_hf_dict(hc.to_dict())
    ours = Transformer(cfg)
    ours.load_hf_state_dict(dict(hm.state_dict()))
    return hm, ours.eval()


@pytest.mark.parametrize("n_heads,n_kv", [(6, 6), (6, 3), (6, 2)])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["rope", "llama3"])
def test_logits_match_transformers(n_heads, n_kv, tie, scaling):
    hm, ours = hf_pair(n_heads, n_kv, tie, scaling)
    assert (ours.config.rope_scaling is not None) == (scaling is not None)
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hm(ids[None]).logits[0]
    out = ours(ids, ours.new_cache(64))
    assert (out - ref).abs().max().item() <= 1e-4


def test_incremental_decoding_equals_full_forward():
    hm, ours = hf_pair(6, 2, False, LLAMA3)
    ids = torch.randint(0, 101, (33,), generator=torch.Generator().manual_seed(2))
    full = ours(ids, ours.new_cache(64))
    cache = ours.new_cache(64)
    parts = [ours(ids[a:b], cache) for a, b in [(0, 10), (10, 11), (11, 20), (20, 33)]]
    assert cache.length == 33
    assert torch.allclose(torch.cat(parts), full, atol=1e-5)


def test_rollback_gives_logits_of_a_cache_that_never_saw_the_rejected_tokens():
    _, ours = hf_pair(6, 3, True, None)
    ids = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(3))
    c1 = ours.new_cache(64)
    ours(ids[:12], c1)
    ours(torch.tensor([5, 6, 7, 8]), c1)  # rejected drafts
    c1.rollback(12)
    a = ours(ids[12:], c1)
    c2 = ours.new_cache(64)
    ours(ids[:12], c2)
    b = ours(ids[12:], c2)
    assert torch.equal(a, b)


def test_tree_forward_equals_each_path_as_a_chain_and_compaction_keeps_it():
    _, ours = hf_pair(6, 2, False, None)
    prefix = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(4))
    #      0     1   2     3   4   5
    toks = torch.tensor([11, 12, 13, 14, 15, 16])
    parents = torch.tensor([-1, 0, 0, 1, -1, 4], dtype=torch.int32)
    cache = ours.new_cache(64)
    ours(prefix, cache)
    tree_logits = ours(toks, cache, parents=parents)
    for path in ([0, 1, 3], [0, 2], [4, 5]):
        c = ours.new_cache(64)
        ours(prefix, c)
        chain = ours(toks[path], c)
        assert torch.allclose(tree_logits[path], chain, atol=1e-5)
    # keep path 0 -> 1 -> 3, then decode one more token: equals a cache that saw only the path
    cache.keep_path(9, torch.tensor([0, 1, 3, -1, -1, -1]), 3)
    assert cache.length == 12
    nxt = ours(torch.tensor([20]), cache)
    c = ours.new_cache(64)
    ours(torch.cat([prefix, toks[[0, 1, 3]], torch.tensor([20])]), c)
    assert torch.allclose(cache.k[:, :, :13], c.k[:, :, :13], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :13], c.v[:, :, :13], atol=1e-5)
    assert torch.allclose(nxt, ours(torch.tensor([20]), _rolled(c, 12)), atol=1e-6)


def _rolled(cache, n):
    cache.rollback(n)
    return cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    _, ours = hf_pair(6, 2, False, None)
    ids = torch.randint(0, 101, (16,), generator=torch.Generator().manual_seed(5))
    ref = ours(ids, ours.new_cache(32))
    low = ours.to(dtype)
    out = low(ids, low.new_cache(32))
    assert out.dtype == torch.float32
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < (0.02 if dtype == torch.float16 else 0.06)


def test_rope_frequencies_stay_fp32_and_follow_the_model():
    """Cast to a low precision, the model keeps rope's inverse frequencies in fp32 (as
    transformers does; bf16 would round them), and a model built under a device context gets
    them on that device (``bench/gpu_check_models.py`` builds its pair under ``cuda``): here
    the meta device, where they stay on the CPU by design, and a cast back to fp32."""
    _, ours = hf_pair(6, 2, False, None)
    want = ours.inv_freq.clone()
    low = ours.to(torch.bfloat16)
    assert low.inv_freq.dtype == torch.float32 and torch.equal(low.inv_freq, want)
    assert low.norm.weight.dtype == torch.bfloat16
    assert torch.equal(low.to(torch.float32).inv_freq, want)
    with torch.device("meta"):
        built = Transformer(ours.config)
    assert built.inv_freq.device.type == "cpu" and built.norm.weight.device.type == "meta"


def test_from_pretrained_single_file(tmp_path):
    hm, _ = hf_pair(6, 3, False, LLAMA3)
    cfg = LlamaConfig.from_hf_dict(hm.config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in hm.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    ours = Transformer.from_pretrained(tmp_path)
    ids = torch.arange(12)
    with torch.no_grad():
        ref = hm(ids[None]).logits[0]
    assert (ours(ids, ours.new_cache(32)) - ref).abs().max() <= 1e-4


def test_tree_depths_and_bits():
    parents = torch.tensor([-1, 0, 0, 1, -1, 4, 3], dtype=torch.int32)
    assert reference.tree_depths(parents).tolist() == [0, 1, 1, 2, 0, 1, 3]
    m = reference.unpack_bits(reference.ancestor_bits(parents), 7)
    assert m[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert m[5].nonzero().flatten().tolist() == [4, 5]


def test_forward_rejects_bad_tokens_and_cache_overflow():
    _, ours = hf_pair(6, 2, False, None)
    cache = ours.new_cache(8)
    with pytest.raises(ValueError, match="tokens"):
        ours(torch.zeros(2, 2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="overflow"):
        ours(torch.arange(9), cache)
    assert cache.length == 0


@pytest.mark.parametrize("tie", [False, True])
def test_vocab_subset_model_equals_full_model_on_its_subset(tie):
    """A subset model gives the full model's logits on its tokens and -inf elsewhere, and embeds
    every other input token with the one shared row."""
    from dataclasses import replace

    from tiny import build, random_hf_state, tiny_config

    from pipespec_fast.models.config import VOCAB_SUBSET_IDS

    cfg = tiny_config(vocab=64, tie=tie)
    sd = random_hf_state(cfg, seed=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(64, generator=g)[:40].sort().values
    other = torch.ones(64, dtype=torch.bool)
    other[ids] = False
    shared = torch.randn(cfg.dim, generator=g)
    emb = sd["model.embed_tokens.weight"].clone()
    emb[other] = shared  # the full model embeds other tokens with the shared row too
    full = build(cfg, {**sd, "model.embed_tokens.weight": emb})
    sub_sd = {**sd, "model.embed_tokens.weight": torch.cat([emb[ids], shared[None]]),
              VOCAB_SUBSET_IDS: ids}
    if not tie:
        sub_sd["lm_head.weight"] = sd["lm_head.weight"][ids]
    sub = build(replace(cfg, vocab_subset=40), sub_sd)
    tokens = torch.randint(0, 64, (30,), generator=g)
    assert other[tokens].any() and (~other[tokens]).any()
    lf, ls = full(tokens, full.new_cache(64)), sub(tokens, sub.new_cache(64))
    assert ls.shape == (30, 64)
    assert torch.isneginf(ls[:, other]).all()
    torch.testing.assert_close(ls[:, ids], lf[:, ids], rtol=1e-5, atol=1e-5)


def _subset_model(tie=True):
    from dataclasses import replace

    from tiny import build, random_hf_state, tiny_config

    from pipespec_fast.models.config import VOCAB_SUBSET_IDS

    cfg = replace(tiny_config(vocab=64, tie=tie), vocab_subset=8)
    sd = random_hf_state(cfg, seed=2)
    sd[VOCAB_SUBSET_IDS] = torch.arange(0, 64, 8)
    return build(cfg, sd), cfg, sd


def test_vocab_subset_head_stays_tied_after_dtype_moves():
    m, _, _ = _subset_model(tie=True)
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    m = m.to(torch.float64)
    assert m.output.weight.dtype == torch.float64
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    assert m.vocab.rows.dtype == torch.int64  # buffers of ids keep their type


def test_vocab_subset_errors():
    from pipespec_fast.models.llama import Transformer

    m, cfg, _ = _subset_model()
    with pytest.raises(IndexError):
        m(torch.tensor([3, -1]), m.new_cache(8))
    with pytest.raises(IndexError):
        m(torch.tensor([64]), m.new_cache(8))
    with pytest.raises(ValueError, match="8 ids|ids for"):
        m.set_vocab_subset(torch.arange(7))
    with pytest.raises(ValueError, match="ascending"):
        m.set_vocab_subset(torch.tensor([0, 8, 16, 24, 32, 40, 56, 48]))
    bare = Transformer(cfg)
    with pytest.raises(RuntimeError, match="set_vocab_subset"):
        bare(torch.tensor([1]), bare.new_cache(8))


@pytest.mark.parametrize("fused", [True, False])
def test_unwritten_cache_slots_are_never_read(fused):
    """The KV cache is allocated uninitialised (``torch.empty``): a cache whose every slot
    holds NaN before use must give the logits of a zeroed one bit for bit, through a prefill,
    chain and tree verification, tree compaction, rollback and one-token decoding (a slot read
    before it is written would turn them NaN)."""
    _, ours = hf_pair(6, 2, False, None)
    ours.use_fused = fused
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 101, (13,), generator=g)
    chain = torch.randint(0, 101, (5,), generator=g)
    toks, parents = torch.tensor([11, 12, 13, 14]), torch.tensor([-1, 0, 0, 2], dtype=torch.int32)

    def run(fill: float) -> list[torch.Tensor]:
        cache = ours.new_cache(64)
        cache.k.fill_(fill), cache.v.fill_(fill)
        out = [ours(prefix, cache), ours(chain, cache)]
        cache.rollback(15)
        out.append(ours(toks, cache, parents=parents))
        cache.keep_path(15, torch.tensor([0, 2, 3, -1]), 3)
        out += [ours(torch.tensor([21]), cache), ours(torch.tensor([22, 23]), cache)]
        return out

    nan, zero = run(float("nan")), run(0.0)
    assert all(torch.isfinite(a).all() for a in zero)
    assert all(torch.equal(a, b) for a, b in zip(nan, zero, strict=True))

