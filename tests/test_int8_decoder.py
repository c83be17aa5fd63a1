"""The int8 compute mode of a model on packed Q4_1 / Q8_0 weights (``models.packed.set_compute``):
the fused layers and the head run the int8 GEMM, batch invariantly, close to the exact mode, and
speculative decoding in that mode reproduces the same mode's greedy decoding and samples
the same mode's distribution."""

from __future__ import annotations

import pytest
import torch

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.cpu import decoder as cpu_decoder
from pipespec_fast.cpu import library, linear, quant
from pipespec_fast.cpu.quant import Q4_1, Q8_0, PackedWeight
from pipespec_fast.models import hf_names
from pipespec_fast.models.packed import set_compute
from tests.test_ngram import sample_first_two
from tests.tiny import build, noisy_copy, random_hf_state, tiny_config

pytestmark = pytest.mark.skipif(
    not (cpu_decoder.available() and quant.available()),
    reason="fused decoder and packed kernel need gcc and an AVX-512F/FMA/F16C CPU")

PROMPT = [1, 5, 7, 9, 3, 11]


def kind_of(name: str) -> int:
    """Q4_1 in even layers, Q8_0 in odd ones and for the embedding/head: both kinds in one
    model (a fused matrix's parts share one kind)."""
    if name.startswith("model.layers."):
        return Q4_1 if int(name.split(".")[2]) % 2 == 0 else Q8_0
    return Q8_0


def packed_model(sd: dict[str, torch.Tensor], cfg, compute: str = "int8", kinds=kind_of):
    """A model whose every matrix is held only in the blocks ``kinds(name)`` says (default:
    Q4_1 / Q8_0; its fp32 values are the blocks' values, so the copies pass attach_packed's
    check), in ``compute`` mode."""
    blocks, dense = {}, dict(sd)
    for name, w in sd.items():
        if w.dim() == 2 and name != hf_names.FINAL_NORM:
            kind = kinds(name)
            pw = PackedWeight(quant.quantize(w.float(), kind), kind, w.shape[1])
            blocks[name], dense[name] = pw, pw.dequantize()
    m = build(cfg, dense)
    assert m.attach_packed(blocks) == 4 * cfg.n_layers + 1
    set_compute(m, compute)
    return m


def one(cfg, seed: int = 0, compute: str = "int8"):
    return packed_model(random_hf_state(cfg, seed, std=0.2), cfg, compute)


CFG = dict(vocab=80, dim=64, n_heads=4, n_kv_heads=2, n_layers=3)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_block_equals_tokens_one_by_one(threads) -> None:
    """Row i of a block of n (n = 1..9, chain after a prefix) equals the token decoded alone,
    bit for bit: logits and the K/V written, on 1 and 2 threads."""
    m = one(tiny_config(**CFG), seed=1)
    kinds = {row.kind[j] for row in cpu_decoder.DecoderPlan(m).table for j in range(4)}
    assert kinds == {Q4_1, Q8_0}
    ids = torch.randint(0, 80, (20,), generator=torch.Generator().manual_seed(2))
    old = linear.set_threads(threads)
    try:
        c = m.new_cache(64)
        m(ids[:7], c)
        singles = torch.cat([m(ids[i : i + 1], c) for i in range(7, 16)])
        k_ref = c.k[:, :, :16].clone()
        for n in range(1, 10):
            c.rollback(7)
            block = m(ids[7 : 7 + n], c)
            assert torch.equal(block, singles[:n]), n
            assert torch.equal(c.k[:, :, 7 : 7 + n], k_ref[:, :, 7 : 7 + n]), n
    finally:
        linear.set_threads(old)


def test_int8_block_equals_tokens_one_by_one_with_the_work_really_split() -> None:
    """The same on a model wide enough that 2 threads really split the work (the tiny one
    above stays under every hand-off threshold): QKV and gate/up (m * k >= 2 * 65536 weights,
    ``int8_gemm.c``'s MIN_THREAD_WORK) and, for the block of 16 after a 120-token prefix, the
    attention (n * heads * ctx * head_dim >= 2^19, ``cpu_decoder.c``); a token alone runs
    its attention on one thread."""
    cfg = tiny_config(vocab=80, dim=256, n_heads=4, n_kv_heads=2, n_layers=2)
    m = one(cfg, seed=3)
    ids = torch.randint(0, 80, (136,), generator=torch.Generator().manual_seed(4))
    old = linear.set_threads(2)
    try:
        c = m.new_cache(160)
        m(ids[:120], c)
        singles = torch.cat([m(ids[i : i + 1], c) for i in range(120, 136)])
        for n in (2, 5, 9, 16):
            c.rollback(120)
            assert torch.equal(m(ids[120 : 120 + n], c), singles[:n]), n
    finally:
        linear.set_threads(old)


def test_int8_plan_flag_and_mode_switch() -> None:
    """The fused table carries the mode; switching rebuilds it; exact mode is unchanged by
    having been int8 (the same bits as a model that never was)."""
    cfg = tiny_config(**CFG)
    sd = random_hf_state(cfg, 4, std=0.2)
    m, ex = packed_model(sd, cfg, "int8"), packed_model(sd, cfg, "exact")
    ids = torch.arange(11)
    y8 = m(ids, m.new_cache(16))
    assert {row.compute for row in m._plan.table} == {library.DECODER_COMPUTE["int8"]}
    assert m.output.compute == "int8"
    set_compute(m, "exact")
    assert m._plan is None and m.output.compute == "exact"
    y = m(ids, m.new_cache(16))
    assert {row.compute for row in m._plan.table} == {library.DECODER_COMPUTE["exact"]}
    assert torch.equal(y, ex(ids, ex.new_cache(16)))
    assert not torch.equal(y8, y)  # the int8 mode really is another arithmetic
    with pytest.raises(ValueError, match="compute: expected one of exact, int8"):
        set_compute(m, "fp8")


def test_int8_fused_layers_equal_the_torch_layers_in_int8() -> None:
    """The fused int8 layer stack computes what the torch layers compute with every Linear in
    int8 (``cpu.int8.int8_linear``), to float rounding (the attention differs in order): one
    layer, so no rounding flip of an activation's int8 value is amplified by later layers."""
    cfg = tiny_config(**{**CFG, "n_layers": 1})
    sd = random_hf_state(cfg, 5, std=0.2)
    fused, layers = packed_model(sd, cfg), packed_model(sd, cfg)
    layers.use_fused = False
    ids = torch.randint(0, 80, (40,), generator=torch.Generator().manual_seed(6))
    a, b = fused(ids, fused.new_cache(64)), layers(ids, layers.new_cache(64))
    assert fused._plan is not None and layers._plan is None
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_int8_logits_close_to_exact() -> None:
    """int8 activations (~0.2-0.5% rounding per value) against the exact mode on a random
    3-layer model (random nets amplify perturbations more than trained ones): mean |error|
    within 5% of the mean |logit|, max within 10% of the max (measured here: 4.2% and 8.3%),
    the top token the same for >= 90% of rows."""
    cfg = tiny_config(**CFG)
    sd = random_hf_state(cfg, 5, std=0.2)
    m8, ex = packed_model(sd, cfg, "int8"), packed_model(sd, cfg, "exact")
    ids = torch.randint(0, 80, (40,), generator=torch.Generator().manual_seed(6))
    a, b = m8(ids, m8.new_cache(64)), ex(ids, ex.new_cache(64))
    err = (a - b).abs()
    assert 0 < err.mean().item() <= 0.05 * b.abs().mean().item()
    assert err.max().item() <= 0.1 * b.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def int8_stages(k: int, seed: int):
    cfg = tiny_config(**CFG)
    target = random_hf_state(cfg, seed, std=0.2)
    sds = [noisy_copy(target, 0.05 * (k - 1 - i), seed + 100 + i) for i in range(k - 1)]
    return [LlamaStage(packed_model(sd, cfg), name=f"s{i}", max_len=256)
            for i, sd in enumerate([*sds, target])]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_int8_pipeline_greedy_equals_int8_ar(k, mode) -> None:
    stages = int8_stages(k, seed=10 + k)
    want = FastPipeline([stages[-1]]).generate(PROMPT, 40, ignore_eos=True).token_ids
    assert len(want) == 40
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False)
    res = pipe.generate(PROMPT, 40, ignore_eos=True)
    assert res.token_ids == want
    tgt = res.stage_stats[-1]
    assert tgt.proposed > 0 and 0 < tgt.accepted < tgt.proposed


def test_from_pretrained_compute_reaches_every_model(tmp_path) -> None:
    """``FastPipeline.from_pretrained(..., compute=)``: checked before loading; every model
    stage gets the mode; the int8 pipeline's greedy output is its int8 target's AR. Without
    ``compute``, a model with Q4_1 / Q8_0 packed weights computes in int8, and in the same
    bits as when asked for by name."""
    from pipespec_fast.models.llama import Transformer
    from tests.test_cpu_decoder import convert_tiny_gguf

    out = convert_tiny_gguf(tmp_path, tied=True)
    with pytest.raises(ValueError, match="compute: expected one of"):
        FastPipeline.from_pretrained([tmp_path / "missing"], compute="fp8")
    pipe = FastPipeline.from_pretrained([out, out], compute="int8", max_len=128)
    assert [s.model.compute for s in pipe.stages] == ["int8", "int8"]
    target = Transformer.from_pretrained(out)
    set_compute(target, "int8")
    want = FastPipeline([LlamaStage(target, max_len=128)]).generate(PROMPT, 12, ignore_eos=True)
    assert pipe.generate(PROMPT, 12, ignore_eos=True).token_ids == want.token_ids
    exact = FastPipeline.from_pretrained([out], max_len=128, compute="exact").stages[0].model
    default = FastPipeline.from_pretrained([out], max_len=128).stages[0].model
    assert (exact.compute, default.compute) == ("exact", "int8")
    ids = torch.tensor(PROMPT)
    logits = {m: m(ids, m.new_cache(8)) for m in (exact, default, target)}
    assert torch.equal(logits[default], logits[target])
    assert not torch.equal(logits[exact], logits[target])


def test_default_compute_is_int8_only_where_q4_1_or_q8_0_weights_are_packed(tmp_path) -> None:
    """``default_compute``: int8 for a model with Q4_1 / Q8_0 packed matrices; exact for one
    holding only fp16 packed ones (the default draft's kind) or fp32 ones, whose products
    the int8 mode would not change."""
    from pipespec_fast.cpu.quant import F16
    from pipespec_fast.models.packed import default_compute

    cfg = tiny_config(**CFG)
    sd = random_hf_state(cfg, 3, std=0.2)
    assert default_compute(packed_model(sd, cfg, "exact")) == "int8"
    assert default_compute(build(cfg, sd)) == "exact"
    matrices = [n for n, w in sd.items() if w.dim() == 2 and n != hf_names.FINAL_NORM]
    sd = {n: w.half().float() if n in matrices else w for n, w in sd.items()}
    half = build(cfg, sd)
    half.attach_packed({n: PackedWeight(quant.quantize(sd[n], F16), F16, sd[n].shape[1])
                        for n in matrices})
    assert half.packed_bytes() > 0 and default_compute(half) == "exact"


# ----------------------------------------------------------------------------- sampling


def outlier_channels(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Every norm's channels 0, 32, ... made ``scale`` times larger: one value per 32-block of
    every product's input is then an outlier, whose block step rounds the others coarsely (as
    real models' outlier channels do, more so), so the int8 distribution is far enough from
    the exact one for 2000 samples to tell them apart."""
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = w.clone()
            out[name][::32] *= scale
    return out


def pooled_chi_square_p(counts: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of ``counts`` under ``joint`` (cells with an expected count under 5 pooled);
    0 when a cell the distribution rules out was drawn."""
    from scipy.stats import chisquare

    exp = joint.flatten().double() * counts.sum()
    if counts[exp == 0].sum() > 0:
        return 0.0
    keep = exp >= 5
    obs = torch.cat([counts[keep].double(), counts[~keep].sum().reshape(1)])
    ex = torch.cat([exp[keep], exp[~keep].sum().reshape(1)])
    return chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue


@pytest.mark.parametrize("k,mode", [(3, "pipespec"), (2, "sync"), (3, "sync")])
def test_int8_sampling_matches_the_int8_target_distribution(k, mode) -> None:
    """Sampled speculative decoding in int8 mode draws the first two tokens from the int8
    target's own AR distribution (its joint, computed token by token: chi-square, 2000 runs),
    and the same samples reject the exact mode's distribution (TV distance ~0.12 here), so a
    pipeline verifying against the exact-mode probabilities would fail this test."""
    from tests.test_pipeline import exact_joint

    cfg = tiny_config(vocab=6, dim=64, n_heads=4, n_kv_heads=2, n_layers=2)
    target = random_hf_state(cfg, 2, std=0.2)
    sds = [noisy_copy(target, 0.6 * (k - 1 - i), 40 + i) for i in range(k - 1)] + [target]
    sds = [outlier_channels(sd, 10.0) for sd in sds]
    stages = [LlamaStage(packed_model(sd, cfg), name=f"s{i}", max_len=64)
              for i, sd in enumerate(sds)]
    prompt = [1, 5, 2, 3, 0, 4]
    joint = exact_joint(stages[-1], prompt, 1.0, None, None)
    exact = exact_joint(LlamaStage(packed_model(sds[-1], cfg, "exact"), max_len=64), prompt,
                        1.0, None, None)
    pipe = FastPipeline(stages, mode=mode)
    counts, accepted = sample_first_two(pipe, prompt, cfg.vocab_size, 2000)
    assert accepted > 0  # drafts were really accepted, not all resampled
    assert pooled_chi_square_p(counts, joint) > 1e-3
    assert pooled_chi_square_p(counts, exact) < 1e-6
