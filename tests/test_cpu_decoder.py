"""The fused CPU layer stack (``pipespec_fast.cpu.decoder``) against the torch layers, its batch
invariance, and models that run on packed weights (fp16 checkpoints, converted GGUF blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipespec_fast.cpu import decoder as cpu_decoder
from pipespec_fast.cpu import quant
from pipespec_fast.models.checkpoint import (
    PACKED_FILE,
    CheckpointError,
    load_packed,
    save_state_dict,
)
from pipespec_fast.models.config import LlamaConfig
from pipespec_fast.models.llama import Transformer
from tests.tiny import build, random_hf_state, tiny_config

needs_fused = pytest.mark.skipif(not cpu_decoder.available(),
                                 reason="fused CPU decoder needs gcc and an AVX2/FMA CPU")
needs_packed = pytest.mark.skipif(
    not quant.available(), reason="packed-weight kernel needs gcc and an AVX-512F/FMA/F16C CPU")

# (dim, n_heads, n_kv): head_dim 8 (generic value sum), 20 (dot-product tail), 64 and 128
# (register accumulators); GQA groups 1, 2, 3 and 4.
SHAPES = [(32, 4, 2), (40, 2, 1), (128, 2, 2), (256, 2, 1), (96, 12, 3)]


def pair(dim: int, n_heads: int, n_kv: int, seed: int = 0, **kw):
    """The same weights twice: the torch layers (reference) and the fused path."""
    cfg = tiny_config(vocab=80, dim=dim, n_heads=n_heads, n_kv_heads=n_kv, n_layers=3, **kw)
    sd = random_hf_state(cfg, seed, std=0.2)
    ref, fused = build(cfg, sd), build(cfg, sd)
    ref.use_fused = False
    return ref, fused


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-4) -> bool:
    return (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())


@needs_fused
@pytest.mark.parametrize("dim,n_heads,n_kv", SHAPES)
def test_fused_matches_torch_layers_chain(dim, n_heads, n_kv) -> None:
    ref, fused = pair(dim, n_heads, n_kv)
    ids = torch.randint(0, 80, (23,), generator=torch.Generator().manual_seed(1))
    cr, cf = ref.new_cache(64), fused.new_cache(64)
    assert close(fused(ids[:17], cf), ref(ids[:17], cr))  # prefill
    for i in range(17, 23, 2):  # then blocks of 2 and single tokens
        assert close(fused(ids[i : i + 2], cf), ref(ids[i : i + 2], cr))
    assert cf.length == cr.length == 23
    assert close(cf.k[:, :, :23], cr.k[:, :, :23]) and close(cf.v[:, :, :23], cr.v[:, :, :23])


@needs_fused
@pytest.mark.parametrize("dim,n_heads,n_kv", SHAPES[:3])
def test_fused_matches_torch_layers_tree(dim, n_heads, n_kv) -> None:
    ref, fused = pair(dim, n_heads, n_kv, seed=3)
    prompt = torch.randint(0, 80, (9,), generator=torch.Generator().manual_seed(2))
    cr, cf = ref.new_cache(64), fused.new_cache(64)
    ref(prompt, cr), fused(prompt, cf)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, -1, 7])  # two roots, branching
    nodes = torch.randint(0, 80, (9,), generator=torch.Generator().manual_seed(4))
    assert close(fused(nodes, cf, parents=parents), ref(nodes, cr, parents=parents))


@needs_fused
def test_fused_matches_transformers_llama3() -> None:
    from tests.test_model import LLAMA3, hf_pair

    hm, ours = hf_pair(6, 2, True, LLAMA3)
    assert ours.use_fused
    ids = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hm(ids[None]).logits[0]
    assert (ours(ids, ours.new_cache(64)) - want).abs().max().item() <= 1e-4


@needs_fused
@pytest.mark.parametrize("dim,n_heads,n_kv,prefix", [
    (32, 4, 2, 12), (128, 2, 1, 12),
    # head_dim 64, query heads per kv head 3 and 5 (attended together up to 4 at a time), a
    # prefix long enough for several 8-key score blocks and a tail
    (192, 3, 1, 29), (640, 10, 2, 29)])
def test_fused_is_batch_invariant(dim, n_heads, n_kv, prefix) -> None:
    """A verified block gives each token, bit for bit, the logits and cache entries of
    decoding it alone (what makes greedy speculative decoding reproduce AR exactly)."""
    _, m = pair(dim, n_heads, n_kv, seed=7)
    ids = torch.randint(0, 80, (prefix + 8,), generator=torch.Generator().manual_seed(8))
    c = m.new_cache(64)
    m(ids[:prefix], c)
    block = m(ids[prefix:], c)
    k_block = c.k[:, :, prefix:prefix + 8].clone()
    c.rollback(prefix)
    singles = torch.cat([m(ids[i : i + 1], c) for i in range(prefix, prefix + 8)])
    assert torch.equal(block, singles)
    assert torch.equal(c.k[:, :, prefix:prefix + 8], k_block)


@needs_fused
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="the AVX-512 attention sums need an AVX-512 CPU")
@pytest.mark.parametrize("dim,n_heads,n_kv", [(128, 2, 1), (256, 2, 2), (640, 10, 2)])
def test_attention_avx512_and_avx2_sums_agree_bit_for_bit(dim, n_heads, n_kv) -> None:
    """The weighted sums of values run on zmm registers where the CPU has AVX-512F and on ymm
    otherwise: one fma chain per element either way, so the same bits."""
    from pipespec_fast.cpu import library

    lib = library.load()
    _, m = pair(dim, n_heads, n_kv, seed=3)
    ids = torch.randint(0, 80, (40,), generator=torch.Generator().manual_seed(4))
    outs = []
    try:
        for wide in (1, 0):
            assert lib.decoder_set_avx512(wide) == wide
            outs.append(m(ids, m.new_cache(48)))
    finally:
        lib.decoder_set_avx512(1)
    assert torch.equal(outs[0], outs[1])


@needs_fused
def test_fused_switch_off(configure) -> None:
    configure(fused=False)
    assert not cpu_decoder.available()
    ref, m = pair(32, 4, 2)
    ids = torch.arange(10)
    out = m(ids, m.new_cache(32))
    assert m._plan is None and not m.use_fused
    assert torch.equal(out, ref(ids, ref.new_cache(32)))


@needs_fused
def test_decoder_plan_argument_errors() -> None:
    _, m = pair(32, 4, 2)
    c = m.new_cache(16)
    plan = cpu_decoder.DecoderPlan(m)
    x = torch.zeros(2, 32)
    cs = torch.zeros(2, 8)
    bits = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(TypeError, match="fp32"):
        plan.run(x.double(), cs, cs, bits, c.k, c.v, 0, 1)
    with pytest.raises(ValueError, match="shape"):
        plan.run(x, torch.zeros(3, 8), cs, bits, c.k, c.v, 0, 1)
    with pytest.raises(ValueError, match="outside the cache"):
        plan.run(x, cs, cs, bits, c.k, c.v, 15, 1)  # past max_len


# ------------------------------------------------------------------ packed-weight models


def save_fp16_checkpoint(path: Path, tie: bool = False) -> tuple[LlamaConfig, dict]:
    cfg = tiny_config(vocab=96, dim=64, n_heads=4, n_kv_heads=2, n_layers=2, tie=tie)
    sd = {k: v.half() for k, v in random_hf_state(cfg, 11, std=0.2).items()}
    save_state_dict(path, sd, cfg)
    return cfg, sd


@needs_packed
@pytest.mark.parametrize("tie", [False, True])
def test_fp16_checkpoint_runs_packed(tmp_path: Path, tie: bool) -> None:
    save_fp16_checkpoint(tmp_path, tie)
    dense = Transformer.from_pretrained(tmp_path, packed=False)
    m = Transformer.from_pretrained(tmp_path)
    assert dense.packed_bytes() == 0
    # every matrix packed: 4 per layer, the head and (untied) the embedding; fp16 = half the
    # fp32 bytes; their fp32 copies are gone (meta placeholders), only the norms stay fp32
    assert m.packed_bytes() == sum(2 * w.numel() for name, w in m.named_parameters()
                                   if name.endswith(("wqkv.weight", "wo.weight", "w13.weight",
                                                     "w2.weight"))) + \
        2 * m.output.weight.numel() + (0 if tie else 2 * m.tok_embeddings.weight.numel())
    assert {name for name, p in m.named_parameters() if not p.is_meta} == \
        {name for name, _ in m.named_parameters() if name.endswith("norm.weight")}
    ids = torch.randint(0, 96, (15,), generator=torch.Generator().manual_seed(0))
    assert close(m(ids, m.new_cache(32)), dense(ids, dense.new_cache(32)))
    c = m.new_cache(32)
    m(ids[:10], c)
    block = m(ids[10:], c)
    c.rollback(10)
    assert torch.equal(block, torch.cat([m(ids[i : i + 1], c) for i in range(10, 15)]))


@needs_packed
def test_packed_copies_dropped_off_cpu_fp32(tmp_path: Path) -> None:
    save_fp16_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path)
    assert m.packed_bytes() > 0
    m = m.to(torch.bfloat16)
    assert m.packed_bytes() == 0
    out = m(torch.arange(5), m.new_cache(8))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_packed_file_errors_name_the_tensor(tmp_path: Path) -> None:
    cfg, sd = save_fp16_checkpoint(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"  # [64, 128]
    good = quant.quantize(sd[name].float(), quant.Q8_0)
    save_file({name: good[:, :-1].contiguous()}, str(tmp_path / PACKED_FILE),
              metadata={"kinds": json.dumps({name: quant.Q8_0})})
    with pytest.raises(CheckpointError, match=f"{name} is torch.uint8 \\[64, 135\\]"):
        load_packed(tmp_path, cfg)
    save_file({name: good}, str(tmp_path / PACKED_FILE), metadata={"kinds": "{}"})
    with pytest.raises(CheckpointError, match=f"{name} has no valid kind"):
        load_packed(tmp_path, cfg)
    save_file({"model.norm.weight": good}, str(tmp_path / PACKED_FILE),
              metadata={"kinds": json.dumps({"model.norm.weight": quant.Q8_0})})
    with pytest.raises(CheckpointError, match="model.norm.weight is not a weight matrix"):
        load_packed(tmp_path, cfg)


@needs_packed
def test_packed_values_must_match_the_checkpoint(tmp_path: Path) -> None:
    cfg, sd = save_fp16_checkpoint(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    other = quant.quantize(torch.randn(64, 128), quant.Q8_0)
    save_file({name: other}, str(tmp_path / PACKED_FILE),
              metadata={"kinds": json.dumps({name: quant.Q8_0})})
    with pytest.raises(ValueError, match=f"packed {name} does not hold the checkpoint's"):
        Transformer.from_pretrained(tmp_path)


@needs_packed
def test_converted_gguf_runs_on_its_blocks(tmp_path: Path) -> None:
    """Every matrix of a Q4_1 / Q8_0 GGUF stays in its blocks (fused QKV and gate/up
    included); logits equal the fp32 weights' up to float rounding."""
    from pipespec_fast.models.convert_gguf import convert_gguf
    from tests.test_convert_gguf import write_tiny_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tied=True, quantize_all=True)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    dense = Transformer.from_pretrained(out, packed=False)
    m = Transformer.from_pretrained(out)
    kinds = {mod.packed.kind for mod in m.modules() if getattr(mod, "packed", None) is not None}
    assert kinds == {quant.Q4_1, quant.Q8_0}
    n_packed = sum(getattr(mod, "packed", None) is not None for mod in m.modules())
    assert n_packed == 4 * m.config.n_layers + 2  # the matmuls, the head, the embedding
    assert m.output.packed is m.tok_embeddings.packed  # tied: one copy
    ids = torch.randint(0, m.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    assert close(m(ids, m.new_cache(32)), dense(ids, dense.new_cache(32)))


@needs_packed
def test_new_weights_drop_packed_copies_and_layer_table(tmp_path: Path) -> None:
    save_fp16_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path)
    ids = torch.arange(6)
    m(ids, m.new_cache(8))  # builds the fused path's table over the loaded weights
    assert m.packed_bytes() > 0 and m._plan is not None
    sd = {k: v * 0.5 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert m.packed_bytes() == 0 and m._plan is None
    fresh = Transformer(m.config)
    fresh.load_state_dict(sd)
    fresh.eval()
    assert torch.equal(m(ids, m.new_cache(8)), fresh(ids, fresh.new_cache(8)))


def convert_tiny_gguf(tmp_path: Path, **kw) -> Path:
    """A tiny Q4_1 / Q8_0 GGUF converted to our layout (every matrix in ggml blocks)."""
    from pipespec_fast.models.convert_gguf import convert_gguf
    from tests.test_convert_gguf import write_tiny_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, quantize_all=True, **kw)
    return convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)


@needs_packed
def test_long_blocks_run_on_the_packed_weights(tmp_path: Path) -> None:
    """One fused table, packed, for every block size: a prefill longer than 64 runs on the
    blocks too (no fp32 matrix is left to run on) and matches the torch layers on fp32."""
    out = convert_tiny_gguf(tmp_path, tied=True)
    m = Transformer.from_pretrained(out)
    ref = Transformer.from_pretrained(out, packed=False)
    ref.use_fused = False
    n = 67
    ids = torch.randint(0, m.config.vocab_size, (n + 2,),
                        generator=torch.Generator().manual_seed(9))
    cm, cr = m.new_cache(n + 4), ref.new_cache(n + 4)
    assert close(m(ids[:n], cm), ref(ids[:n], cr))
    kinds = {row.kind[j] for row in m._plan.table for j in range(4)}
    assert kinds and kinds <= {quant.Q4_1, quant.Q8_0}  # 0 would be an fp32 matrix
    assert close(m(ids[n:], cm), ref(ids[n:], cr))


@needs_packed
@pytest.mark.parametrize("threads", [1, 2])
def test_long_prefill_equals_short_blocks_bit_for_bit(tmp_path: Path, threads: int) -> None:
    """A 200-token prefill (the GEMM's panel path) then decoding gives, bit for bit, the
    logits and cache of feeding the same tokens in blocks of at most 64 (and of 1): which
    path a row took never shows."""
    from pipespec_fast.cpu import linear

    save_fp16_checkpoint(tmp_path)  # dim 64, inter 128: the GEMMs split over 2 threads
    m = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (206,), generator=torch.Generator().manual_seed(21))
    old = linear.set_threads(threads)
    try:
        runs = []
        for blocks in ([200, 1, 1, 1, 1, 1, 1], [64, 64, 64, 8, 3, 3], [37, 1, 27, 64, 71, 6]):
            c, outs, at = m.new_cache(210), [], 0
            for b in blocks:
                outs.append(m(ids[at : at + b], c))
                at += b
            runs.append((torch.cat(outs), c.k[:, :, :206].clone(), c.v[:, :, :206].clone()))
    finally:
        linear.set_threads(old)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@needs_packed
def test_packed_only_model_keeps_its_values_everywhere(tmp_path: Path) -> None:
    """Without fp32 matrices, the model still equals the dense one: its state_dict (the
    packed rows dequantised), its torch layers, a conversion (fp32 restored first), and
    materialize_fp32."""
    save_fp16_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path)
    dense = Transformer.from_pretrained(tmp_path, packed=False)
    want = dense.state_dict()
    got = m.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.arange(12) % 96
    before = m(ids, m.new_cache(16))
    torch_layers = Transformer.from_pretrained(tmp_path)
    torch_layers.use_fused = False  # the reference layers, on the packed kernel
    assert close(torch_layers(ids, torch_layers.new_cache(16)), dense(ids, dense.new_cache(16)))
    same = m.float().to("cpu")  # conversions that keep CPU fp32 keep the packed-only form
    assert same is m and m.layers[0].attention.wqkv.weight.is_meta
    m.materialize_fp32()
    assert torch.equal(m.layers[0].feed_forward.w2.weight, dense.layers[0].feed_forward.w2.weight)
    assert m.packed_bytes() > 0 and not any(p.is_meta for p in m.parameters())
    assert torch.equal(m(ids, m.new_cache(16)), before)  # still on the packed copies


@needs_packed
def test_fp32_required_but_dropped_is_a_clear_error(tmp_path: Path) -> None:
    save_fp16_checkpoint(tmp_path)
    m = Transformer.from_pretrained(tmp_path)
    wo = m.layers[0].attention.wo
    with pytest.raises(RuntimeError, match="held only in packed form.*packed=False"):
        wo(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="held only in packed form.*use_packed=False"):
        cpu_decoder.DecoderPlan(m, use_packed=False)
    assert wo(torch.zeros(2, 64)).shape == (2, 64)  # fp32 CPU: the packed kernel


@needs_packed
def test_attach_packed_keep_fp32_and_in_memory_models(tmp_path: Path) -> None:
    """attach_packed on a dense in-memory model checks against its own fp32 rows, then drops
    them (or keeps them with keep_fp32=True: both tables can then be built)."""
    cfg, sd = save_fp16_checkpoint(tmp_path)
    weights = load_packed(tmp_path, cfg)
    keep = Transformer.from_pretrained(tmp_path, packed=False)
    assert keep.attach_packed(weights, keep_fp32=True) == 4 * cfg.n_layers + 1
    assert not any(p.is_meta for p in keep.parameters())
    dense_plan = cpu_decoder.DecoderPlan(keep, use_packed=False)
    assert {row.kind[j] for row in dense_plan.table for j in range(4)} == {0}
    drop = Transformer.from_pretrained(tmp_path, packed=False)
    drop.attach_packed(weights)
    assert drop.tok_embeddings.weight.is_meta and drop.output.weight.is_meta
    ids = torch.arange(9)
    assert torch.equal(drop(ids, drop.new_cache(16)), keep(ids, keep.new_cache(16)))


@needs_fused
def test_fused_threaded_paths_match_one_thread() -> None:
    """Big enough blocks for the row- and attention-parallel loops (2 threads) give the same
    bits as one thread, and match the torch layers."""
    from pipespec_fast.cpu import linear

    ref, m = pair(128, 2, 1, seed=12)  # head_dim 64, inter 256
    ids = torch.randint(0, 80, (300,), generator=torch.Generator().manual_seed(13))
    outs = []
    old = linear.set_threads(1)
    try:
        for threads in (1, 2):
            linear.set_threads(threads)
            c = m.new_cache(320)
            outs.append((m(ids[:260], c), m(ids[260:], c), c.k[:, :, :300].clone()))
    finally:
        linear.set_threads(old)
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)
    cr = ref.new_cache(320)
    assert close(outs[0][0], ref(ids[:260], cr)) and close(outs[0][1], ref(ids[260:], cr))


@needs_fused
def test_tree_block_then_path_equals_decoding_the_path() -> None:
    """Verify a tree, keep an accepted path (kv_compact), go on decoding: the logits equal
    decoding the path token by token from the start, bit for bit."""
    _, m = pair(64, 4, 2, seed=14)
    prompt = torch.randint(0, 80, (7,), generator=torch.Generator().manual_seed(15))
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    nodes = torch.tensor([11, 12, 13, 14, 15, 16])
    path = torch.tensor([0, 1, 3, 5])  # 11 -> 12 -> 14 -> 16
    c = m.new_cache(32)
    m(prompt, c)
    tree = m(nodes, c, parents=parents)
    c.keep_path(7, path, 4)
    after = m(torch.tensor([17]), c)
    c2 = m.new_cache(32)
    m(prompt, c2)
    step = torch.cat([m(nodes[i : i + 1], c2) for i in path.tolist()])
    assert torch.equal(tree[path], step)
    assert torch.equal(after, m(torch.tensor([17]), c2))


@needs_fused
def test_decoder_plan_refuses_a_foreign_cache() -> None:
    _, m = pair(32, 4, 2)
    other, _ = pair(64, 4, 2)
    with pytest.raises(ValueError, match="caches"):
        m(torch.arange(3), other.new_cache(16))
    c = m.new_cache(16)
    plan = cpu_decoder.DecoderPlan(m)
    x, cs = torch.zeros(2, 32), torch.zeros(2, 8)
    bits = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cos/sin"):
        plan.run(x, cs, torch.zeros(3, 8), bits, c.k, c.v, 0, 1)
    with pytest.raises(ValueError, match="outside the cache"):
        plan.run(x, cs, cs, bits, c.k, c.v, -1, 1)


def test_load_rows_reads_rows_alone(tmp_path: Path) -> None:
    """The rows packed copies are checked against, read without loading the tensors: equal to
    the same rows of the full load, in fp32; a name that is no weight matrix is refused."""
    from pipespec_fast.models.checkpoint import load_rows, load_state_dict

    cfg, _ = save_fp16_checkpoint(tmp_path)
    full = load_state_dict(tmp_path, cfg)
    want = {"model.layers.1.mlp.up_proj.weight": [0, 5, 127], "model.embed_tokens.weight": [95]}
    got = load_rows(tmp_path, want)
    assert list(got) == list(want)
    for name, rows in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], full[name][rows])
    with pytest.raises(CheckpointError, match="no weight matrix model.norm.weight"):
        load_rows(tmp_path, {"model.norm.weight": [0]})


def test_packed_kinds_metadata_must_be_a_mapping(tmp_path: Path) -> None:
    cfg, sd = save_fp16_checkpoint(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: quant.quantize(sd[name].float(), quant.Q8_0)},
              str(tmp_path / PACKED_FILE), metadata={"kinds": "[3]"})
    with pytest.raises(CheckpointError, match="'kinds' metadata must map"):
        load_packed(tmp_path, cfg)


@needs_packed
def test_packed_rows_left_in_llamacpp_order_are_refused(tmp_path: Path) -> None:
    """The load check probes rows inside a head: a q projection whose rows were not
    un-permuted (first and last rows are fixed points of the permutation) is caught."""
    from pipespec_fast.models.convert_gguf import convert_gguf
    from tests.test_convert_gguf import llamacpp_permute, write_tiny_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, quantize_all=True)
    out = convert_gguf(src, tmp_path / "out", tokenizer=False, progress=False)
    cfg = LlamaConfig.from_dir(out)
    from safetensors import safe_open

    with safe_open(str(out / PACKED_FILE), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.self_attn.q_proj.weight"
    rows = tensors[name].numpy()
    permuted = torch.from_numpy(llamacpp_permute(rows, cfg.n_heads).copy())
    assert permuted[0].equal(tensors[name][0]) and permuted[-1].equal(tensors[name][-1])
    tensors[name] = permuted
    save_file(tensors, str(out / PACKED_FILE), metadata=meta)
    with pytest.raises(ValueError, match=f"packed {name}\\+"):
        Transformer.from_pretrained(out)


@needs_packed
def test_loading_keeps_one_copy_of_each_packed_matrix(tmp_path: Path) -> None:
    """``attach_loaded`` takes over the dict ``load_packed`` read: every part ends as a view of
    the matmul copy it was joined into (its own buffer freed), a single part is the read
    tensor itself, and the model computes what ``from_pretrained`` gives."""
    from pipespec_fast.models import packed as packed_weights
    from pipespec_fast.models.checkpoint import load_packed, load_state_dict

    cfg, _ = save_fp16_checkpoint(tmp_path)
    weights = load_packed(tmp_path, cfg)
    down = "model.layers.0.mlp.down_proj.weight"
    read_down = weights[down].data
    covered = packed_weights.covered_names(cfg, weights)
    hf = load_state_dict(tmp_path, cfg, skip=covered)
    with torch.device("meta"):
        m = Transformer(cfg)
    m.load_hf_state_dict(hf)
    m.inv_freq = Transformer.from_pretrained(tmp_path, packed=False).inv_freq
    packed_weights.attach_loaded(m, tmp_path, weights, covered)
    layer = m.layers[0]
    assert layer.feed_forward.w2.packed.data is read_down  # no copy of a single part
    qkv = layer.attention.wqkv.packed.data
    for name in ("q_proj", "k_proj", "v_proj"):
        part = weights[f"model.layers.0.self_attn.{name}.weight"].data
        assert part.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    ref = Transformer.from_pretrained(tmp_path)
    ids = torch.arange(7)
    assert torch.equal(m(ids, m.new_cache(8)), ref(ids, ref.new_cache(8)))
