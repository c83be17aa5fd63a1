"""Distil a small LLaMA draft from the target on the target's own generations.

    .venv/bin/python -m tools.draft_data --out DATA            # the target answers prompts
    .venv/bin/python -m tools.train_draft --data DATA --out DIR [--layers 3 --subset 12288]

The draft keeps the target's width, heads and MLP size and starts from the target: its layers
are copies of target layers (``--init-layers``), its embedding the target's rows. It embeds and
predicts only a vocabulary subset: the ``--subset`` tokens the target generates most often in
the training data (``LlamaConfig.vocab_subset``); every other input token shares one learned row
and every other output token gets probability 0, which keeps speculative sampling exact (the
target's residual covers them). The head is tied to the subset's embedding rows.

Loss: cross-entropy against the target's top-k distribution at every generated position,
renormalised over the subset (soft distillation: matching the target's probabilities is what
stochastic acceptance rewards, and its argmax is what greedy acceptance rewards). Training runs
in bf16 autocast (about 5x fp32 matmul speed on AVX-512-BF16 CPUs); the exported weights are
fp16 safetensors in the HF layout, with ``training.json`` (data, settings and held-out greedy
agreement per prompt kind) and the target's tokenizer files beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipespec_fast.models import hf_names
from pipespec_fast.models.checkpoint import load_checkpoint, save_state_dict
from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig
from pipespec_fast.models.llama import rope_inv_freq, vocab_subset_rows
from tools.draft_prompts import resembles_benchmark

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------------------------- data


def load_rows(data_dir: Path, tokenizer=None) -> list[dict]:
    """Every generated answer of every shard, in shard order, without prompts that resemble a
    benchmark question (``draft_prompts.resembles_benchmark``; shards written before the data
    generator filtered them carry no text, so their prompt is decoded with ``tokenizer``)."""
    rows: list[dict] = []
    for path in sorted(data_dir.glob("shard-*.pt")):
        rows += torch.load(path, weights_only=True)["rows"]
    if not rows:
        raise FileNotFoundError(f"{data_dir}: no shard-*.pt files (run tools.draft_data first)")
    keep = []
    for r in rows:
        text = r.get("text")
        if text is None and tokenizer is not None:
            text = tokenizer.decode(r["prompt"])
        if len(r["tokens"]) > 0 and not (text and resembles_benchmark(text)):
            keep.append(r)
    return keep


def kept_rows(dirs: list[Path]) -> list[dict]:
    """:func:`load_rows` of each folder in turn, prompts decoded with the default draft's
    tokenizer where a shard carries no text; a folder without shards ends the tool with its
    one-line error."""
    from pipespec_fast.loading import load_tokenizers
    from pipespec_fast.models.defaults import DRAFT_DIR

    tok = load_tokenizers([DRAFT_DIR])[0]
    rows: list[dict] = []
    for d in dirs:
        try:
            rows += load_rows(Path(d), tok)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    return rows


def choose_subset(rows: list[dict], size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent generated tokens (plus ``always``), ascending ids."""
    counts = Counter(t for r in rows for t in r["tokens"])
    for r in rows:  # the target's runner-up choices count a little too
        counts.update(r["top_ids"][:, 1:4].flatten().tolist())
    keep = set(always)
    for tok, _ in counts.most_common():
        if len(keep) >= size:
            break
        keep.add(tok)
    return torch.tensor(sorted(keep)[:size], dtype=torch.int64)


class Batcher:
    """Length-bucketed batches of ``(input rows, loss positions, soft targets)``."""

    def __init__(self, rows: list[dict], vocab_rows: torch.Tensor, subset: int,
                 max_tokens: int, max_prompt: int) -> None:
        self.items = []
        for r in rows:
            prompt = r["prompt"][-max_prompt:] if max_prompt > 0 else []
            if not prompt:  # the first generated token needs a position to be predicted at
                continue
            seq = prompt + r["tokens"]
            n = len(r["tokens"])
            # position p of the input predicts seq[p + 1]; generated token j sits at
            # len(prompt) + j, so it is predicted at len(prompt) + j - 1
            self.items.append((torch.tensor(seq[:-1]), len(prompt) - 1, n, r))
        self.vocab_rows, self.subset, self.max_tokens = vocab_rows, subset, max_tokens

    def batches(self, rng: random.Random) -> list[list[int]]:
        order = sorted(range(len(self.items)), key=lambda i: (len(self.items[i][0]), rng.random()))
        out, cur, width = [], [], 0
        for i in order:
            w = max(width, len(self.items[i][0]))
            if cur and w * (len(cur) + 1) > self.max_tokens:
                out.append(cur)
                cur, w = [], len(self.items[i][0])
            cur.append(i)
            width = w
        if cur:
            out.append(cur)
        rng.shuffle(out)
        return out

    def collate(self, idx: list[int]):
        width = max(len(self.items[i][0]) for i in idx)
        x = torch.full((len(idx), width), 0, dtype=torch.int64)
        b_pos, t_pos, tgt_rows, tgt_p, in_subset = [], [], [], [], []
        for b, i in enumerate(idx):
            seq, start, n, r = self.items[i]
            x[b, : len(seq)] = seq
            b_pos.append(torch.full((n,), b))
            t_pos.append(torch.arange(start, start + n))
            rows = self.vocab_rows[r["top_ids"].long()]  # [n, k], subset rows or S
            p = r["top_logp"].float().exp() * (rows < self.subset)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
            tgt_rows.append(rows.clamp_max(self.subset - 1))
            tgt_p.append(p)
            in_subset.append(rows[:, 0] < self.subset)
        return (self.vocab_rows[x], torch.cat(b_pos), torch.cat(t_pos), torch.cat(tgt_rows),
                torch.cat(tgt_p), torch.cat(in_subset))


# ---------------------------------------------------------------------------------- model


class TrainBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, hd = cfg.dim, cfg.head_dim
        self.cfg = cfg
        self.q = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.norm1 = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.norm2 = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        h = self.norm1(x)
        q = self.q(h).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class TrainDraft(nn.Module):
    """The draft for training: batched, causal, tied subset head (row ``S`` is input-only)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.embedding_rows, cfg.dim)
        self.blocks = nn.ModuleList(TrainBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def hidden(self, rows: torch.Tensor) -> torch.Tensor:
        T = rows.shape[1]
        f = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((f, f), -1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(rows)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embed.weight[: self.cfg.vocab_subset].T

    @classmethod
    def from_target(cls, cfg: LlamaConfig, target: dict[str, torch.Tensor],
                    ids: torch.Tensor, init_layers: list[int]) -> TrainDraft:
        """The subset rows of the target's embedding (plus their mean over the other tokens as
        the shared row), its final norm, and copies of its layers ``init_layers``."""
        emb = target[hf_names.EMBED]
        other = torch.ones(emb.shape[0], dtype=torch.bool)
        other[ids] = False
        sd = {hf_names.EMBED: torch.cat([emb[ids], emb[other].mean(0, keepdim=True)]),
              hf_names.FINAL_NORM: target[hf_names.FINAL_NORM]}
        for i, src in enumerate(init_layers):
            for hf in HF_NAMES.values():
                sd[hf_names.layer(i, hf)] = target[hf_names.layer(src, hf)]
        return cls.from_hf_state(cfg, sd)

    @classmethod
    def from_hf_state(cls, cfg: LlamaConfig, sd: dict[str, torch.Tensor]) -> TrainDraft:
        """The inverse of :meth:`hf_state` (for checks and for resuming)."""
        m = cls(cfg)
        with torch.no_grad():
            m.embed.weight.copy_(sd[hf_names.EMBED])
            m.norm.weight.copy_(sd[hf_names.FINAL_NORM])
            for i, blk in enumerate(m.blocks):
                for name, hf in HF_NAMES.items():
                    getattr(blk, name).weight.copy_(sd[hf_names.layer(i, hf)])
        return m

    def hf_state(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF-layout tensors (fp16) of this draft, ``model.vocab_subset_ids`` included."""
        sd = {hf_names.EMBED: self.embed.weight, hf_names.FINAL_NORM: self.norm.weight,
              VOCAB_SUBSET_IDS: ids}
        for i, blk in enumerate(self.blocks):
            for name, hf in HF_NAMES.items():
                sd[hf_names.layer(i, hf)] = getattr(blk, name).weight
        return {k: v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
                for k, v in sd.items()}


# TrainBlock's modules and the HF per-layer tensors they hold (unfused, as transformers has them)
HF_NAMES = {"q": hf_names.Q, "k": hf_names.K, "v": hf_names.V, "o": hf_names.O,
            "gate": hf_names.GATE, "up": hf_names.UP, "down": hf_names.DOWN,
            "norm1": hf_names.ATTN_NORM, "norm2": hf_names.FFN_NORM}


# ---------------------------------------------------------------------------------- loop


def soft_ce(model: TrainDraft, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean soft cross-entropy over generated positions, and greedy agreement flags (a target
    token outside the subset is never agreed with)."""
    x, b_pos, t_pos, tgt_rows, tgt_p, in_subset = batch
    h = model.hidden(x)[b_pos, t_pos]
    logp = torch.log_softmax(model.logits(h).float(), -1)
    loss = -(tgt_p * logp.gather(1, tgt_rows)).sum(-1).mean()
    agree = (logp.argmax(-1) == tgt_rows[:, 0]) & in_subset
    return loss, agree


@torch.no_grad()
def evaluate(model: TrainDraft, data: Batcher, rows: list[dict]) -> dict[str, float]:
    """Held-out greedy agreement with the target (teacher-forced), per prompt kind."""
    model.eval()
    hits: Counter = Counter()
    total: Counter = Counter()
    for idx in data.batches(random.Random(0)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, agree = soft_ce(model, data.collate(idx))
        start = 0
        for i in idx:
            n = data.items[i][2]
            kind = data.items[i][3]["kind"]
            hits[kind] += int(agree[start : start + n].sum())
            total[kind] += n
            start += n
    model.train()
    return {k: hits[k] / total[k] for k in sorted(total)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, nargs="+",
                    help="data dirs of tools.draft_data (held-out answers: from the last)")
    ap.add_argument("--init-from", default=None,
                    help="continue training this draft dir (keeps its shape and subset)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default=None, help="target model dir (default: SmolLM2)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--init-layers", default=None, help="target layers to copy (default 0..L-1)")
    ap.add_argument("--subset", type=int, default=12288)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-tokens", type=int, default=6144)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=96, help="answers kept for evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200, help="steps between held-out "
                    "evaluations (each also exports the draft so far)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget: replaces --epochs; the schedule decays over it and "
                    "training stops at it")
    args = ap.parse_args(argv)

    from pipespec_fast.models.defaults import default_target_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target_dir = Path(args.target or default_target_dir())
    tcfg, tsd = load_checkpoint(target_dir)
    tokenizer = None
    if (target_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(target_dir), trust_remote_code=False)
    # held-out answers come from the last data set (earlier ones may have trained --init-from)
    sets = [load_rows(Path(d), tokenizer) for d in args.data]
    rng = random.Random(args.seed)
    rng.shuffle(sets[-1])
    held, train = sets[-1][: args.held_out], sets[-1][args.held_out :]
    for rows in sets[:-1]:
        train = rows + train
    if args.init_from:  # continue from a draft: its shape and vocabulary subset
        cfg, dsd = load_checkpoint(args.init_from)
        ids = dsd[VOCAB_SUBSET_IDS]
        model = TrainDraft.from_hf_state(cfg, dsd)
    else:
        ids = choose_subset(train, args.subset, always=tcfg.eos_token_ids
                            + ([tcfg.bos_token_id] if tcfg.bos_token_id is not None else []))
        cfg = LlamaConfig(**{**tcfg.__dict__, "n_layers": args.layers,
                             "vocab_subset": len(ids), "tie_word_embeddings": True})
        init = ([int(s) for s in args.init_layers.split(",")] if args.init_layers
                else list(range(args.layers)))
        if len(init) != args.layers:
            raise SystemExit(f"--init-layers names {len(init)} layers, --layers is "
                             f"{args.layers}")
        if not all(0 <= i < tcfg.n_layers for i in init):
            raise SystemExit(f"--init-layers: the target has layers 0..{tcfg.n_layers - 1}")
        model = TrainDraft.from_target(cfg, tsd, ids, init)
    del tsd
    vocab_rows = vocab_subset_rows(ids, cfg.vocab_size)
    train_b = Batcher(train, vocab_rows, cfg.vocab_subset, args.batch_tokens, args.max_prompt)
    held_b = Batcher(held, vocab_rows, cfg.vocab_subset, args.batch_tokens, args.max_prompt)
    gen_tokens = sum(len(r["tokens"]) for r in train)
    covered = sum(int((vocab_rows[torch.tensor(r["tokens"])] < cfg.vocab_subset).sum())
                  for r in held)
    coverage = covered / max(1, sum(len(r["tokens"]) for r in held))
    print(f"{len(train)} answers ({gen_tokens} generated tokens), {len(held)} held out; "
          f"subset {len(ids)} covers {coverage:.1%} of held-out tokens", flush=True)
    before = evaluate(model, held_b, held)
    print("before training:", before, flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = len(train_b.batches(random.Random(0)))
    total = max(1, int(steps_per_epoch * args.epochs))
    warm = min(50, total // 10)
    step, t0 = 0, time.perf_counter()
    history: list[dict] = []
    losses: list[float] = []
    done = False

    def state(agreement: dict) -> dict:
        return {"target": target_dir.name, "data": [str(d) for d in args.data],
                "init_from": args.init_from, "answers": len(train),
                "generated_tokens": gen_tokens, "subset_coverage_held_out": coverage,
                "settings": {k: v for k, v in vars(args).items()
                             if k not in ("data", "out", "init_from")},
                "steps": step, "minutes": (time.perf_counter() - t0) / 60,
                "held_out_greedy_agreement_before": before,
                "held_out_greedy_agreement": agreement, "history": history,
                "train_loss_first_steps": sum(losses[:10]) / max(1, len(losses[:10])),
                "train_loss_last_steps": sum(losses[-10:]) / max(1, len(losses[-10:]))}

    while not done:
        for idx in train_b.batches(rng):
            # cosine decay over the steps, or over the time budget when one is given
            frac = ((time.perf_counter() - t0) / 60 / args.max_minutes if args.max_minutes
                    else (step - warm) / max(1, total - warm))
            lr = args.lr * (step / warm if step < warm else
                            0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, agree = soft_ce(model, train_b.collate(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 20 == 0:
                mins = (time.perf_counter() - t0) / 60
                print(f"step {step}/{total} loss {losses[-1]:.3f} agree "
                      f"{agree.float().mean().item():.3f} lr {lr:.2e} {mins:.1f} min", flush=True)
            if step % args.eval_every == 0:
                ev = evaluate(model, held_b, held)
                history.append({"step": step, "minutes": (time.perf_counter() - t0) / 60, **ev})
                print("held-out agreement:", ev, flush=True)
                export(model, ids, cfg, target_dir, Path(args.out), state(ev))
            over_time = args.max_minutes and (time.perf_counter() - t0) / 60 > args.max_minutes
            if (step >= total and not args.max_minutes) or over_time:
                done = True
                break
    final = evaluate(model, held_b, held)
    export(model, ids, cfg, target_dir, Path(args.out), state(final))
    print("final held-out agreement:", final, "->", args.out, flush=True)


def export(model: TrainDraft, ids: torch.Tensor, cfg: LlamaConfig, target_dir: Path, out: Path,
           meta: dict) -> None:
    """Write the draft (fp16 safetensors, config, the target's tokenizer, training.json) into a
    temporary directory, then swap it for ``out``: readers never see a half-written draft."""
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_state_dict(tmp, model.hf_state(ids), cfg)
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy(target_dir / name, tmp / name)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
