"""Train a feature head (``models/feature_head.py``) for the default target on the target's
own answers, and export it as a model folder.

    .venv/bin/python -m tools.train_feature_head --out models/drafts/SmolLM2-135M-head \
        [--tokens 800000 --minutes 30]

Data: the answers in the embedded n-gram store (the target's greedy answers to prompts made
by ``tools/draft_prompts.py``, none resembling a benchmark question), each after the chat
template's assistant header. The target (int8 compute, as the pipeline runs it) reads them
once; its normalised last-layer outputs (the features) are cached under
``~/.cache/pipespec-fast/feature-data`` (fp16, ~1.2 KB per token).

Training, for every position ``p`` of an answer: input the token at ``p`` and the target's
feature at ``p - 1``; targets the target's feature at ``p`` (smooth L1) and the target's
next-token distribution at ``p`` over the head's vocabulary subset (soft cross-entropy), as
EAGLE does. Input features get uniform noise (EAGLE's trick: at drafting time the head reads
its own, imperfect, estimates past the first row). The layer runs in bf16 autocast; the
target's embedding (input rows and head) and final norm are frozen.

The held-out answers (``--held-out``) give agreement at depth 1 (the head on the target's
features) and depth 2 (on its own estimate for the row before, given depth 1 was right).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path.home() / ".cache" / "pipespec-fast" / "feature-data"
ASSISTANT = "<|im_start|>assistant\n"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------------------------- data


def store_answers(store_dir: Path) -> list[np.ndarray]:
    """The answers of an n-gram store folder (``tokens.npy``, 65535-separated)."""
    flat = np.load(store_dir / "tokens.npy").astype(np.int64)
    cuts = np.flatnonzero(flat == 65535)
    return [s[:-1] for s in np.split(flat, cuts + 1)[:-1]]


@torch.inference_mode()
def target_features(target, ids: list[int]) -> torch.Tensor:
    """``[n, dim]``: the target's normalised last-layer outputs over ``ids``."""
    t = torch.tensor(ids)
    cache = target.new_cache(len(ids) + 1)
    feats = torch.zeros(len(ids) + 1, target.config.dim)
    target(t, cache, last_n=1, features=feats)
    return feats[: len(ids)]


def dump(pipe, answers: list[np.ndarray], budget: int, seed: int, path: Path) -> dict:
    """Features of shuffled answers up to ``budget`` tokens, saved to ``path``."""
    target = pipe.stages[-1].model
    prefix = pipe.tokenizer.encode(ASSISTANT)
    order = np.random.default_rng(seed).permutation(len(answers))
    xs, toks, offs, tot, t0 = [], [], [0], 0, time.time()
    for j in order:
        ids = list(prefix) + answers[j][:400].tolist()
        if len(ids) < 8:
            continue
        x = target_features(target, ids)
        xs.append(x.half())
        toks.append(torch.tensor(ids))
        offs.append(offs[-1] + len(ids))
        tot += len(ids)
        if len(offs) % 500 == 0:
            print(f"features: {tot} tokens, {time.time() - t0:.0f} s", flush=True)
        if tot >= budget:
            break
    data = {"x": torch.cat(xs), "tok": torch.cat(toks), "off": torch.tensor(offs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


# ---------------------------------------------------------------------------------- model


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class TrainHead(nn.Module):
    """The head's trainable part (fc and one LLaMA layer) in plain torch, batched rows of
    packed answers (``mask``: causal within an answer)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d, self.nh, self.nkv, self.hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.fc = nn.Linear(2 * d, d)
        self.q = nn.Linear(d, self.nh * self.hd, bias=False)
        self.k = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.v = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.o = nn.Linear(self.nh * self.hd, d, bias=False)
        self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.register_buffer("inv", 1.0 / (cfg.rope_theta ** (
            torch.arange(0, self.hd, 2).float() / self.hd)), persistent=False)

    def _rope(self, x, pos):
        f = pos[..., None].float() * self.inv
        cos, sin = torch.cat([f.cos()] * 2, -1)[:, None], torch.cat([f.sin()] * 2, -1)[:, None]
        h = self.hd // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    def forward(self, emb, g, pos, mask, norm_w):
        """``emb, g: [B, L, dim]`` -> the head's ``ĝ: [B, L, dim]`` (after the target's
        final norm ``norm_w``)."""
        x = self.fc(torch.cat([emb, g], -1))
        b, n, _ = x.shape
        h = rms(x, self.n1, self.eps)
        q = self._rope(self.q(h).view(b, n, self.nh, self.hd).transpose(1, 2), pos)
        k = self._rope(self.k(h).view(b, n, self.nkv, self.hd).transpose(1, 2), pos)
        v = self.v(h).view(b, n, self.nkv, self.hd).transpose(1, 2)
        rep = self.nh // self.nkv
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                           v.repeat_interleave(rep, 1), attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, self.nh * self.hd))
        h = rms(x, self.n2, self.eps)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return rms(x, norm_w, self.eps)


class Batches:
    """Answers packed into rows of ``length`` positions; row ``p`` of an answer pairs (token
    ``p``, feature ``p - 1``) with targets at ``p``."""

    def __init__(self, data: dict, emb: torch.Tensor, norm_w: torch.Tensor, eps: float,
                 length: int = 256) -> None:
        self.data, self.emb, self.norm_w, self.eps, self.length = data, emb, norm_w, eps, length

    def make(self, answers: list[int]):
        off, n_max = self.data["off"], self.length
        rows, cur, used = [], [], 0
        for i in answers:
            a, b = int(off[i]), int(off[i + 1])
            for c in range(a + 1, b, n_max):
                m = min(n_max, b - c)
                if used + m > n_max:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append((c, m, c - a))
                used += m
        if cur:
            rows.append(cur)
        B = len(rows)
        idx = torch.zeros(B, n_max, dtype=torch.long)
        pos = torch.zeros(B, n_max, dtype=torch.long)
        seg = torch.full((B, n_max), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            p = 0
            for s, (c, m, p0) in enumerate(row):
                idx[r, p:p + m] = torch.arange(c, c + m)
                pos[r, p:p + m] = torch.arange(p0, p0 + m)
                seg[r, p:p + m] = s
                p += m
        valid = seg >= 0
        mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(n_max, n_max).bool().tril()
        mask = (mask & valid[:, :, None]) | torch.eye(n_max, dtype=torch.bool)
        x, tok = self.data["x"], self.data["tok"]
        emb = self.emb[tok[idx]]
        g_in = x[idx - 1].float()
        g_out = x[idx].float()
        return emb, g_in, pos, mask[:, None], g_out, valid


def _soft_ce(est, g_out, sub_emb):
    """Soft cross-entropy of the head's ``est`` logits against the target's distribution
    (over the subset) at the same rows, and the features' smooth L1."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = est @ sub_emb.T
    with torch.no_grad():
        soft = torch.softmax(g_out @ sub_emb.T, -1)
    ce = -(soft * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
    return ce, F.smooth_l1_loss(est.float(), g_out)


def losses(head, batch, norm_w, sub_emb, noise: float, unroll: bool = False):
    """``(ce, reg)`` of a batch; ``unroll``: plus a second pass where every row reads the
    head's own estimate of the row before (what drafting at depth 2 and deeper reads),
    averaged with the first."""
    emb, g_in, pos, mask, g_out, valid = batch
    g_in = g_in + (torch.rand_like(g_in) - 0.5) * noise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est = head(emb, g_in, pos, mask, norm_w)
    ce, reg = _soft_ce(est[valid], g_out[valid], sub_emb)
    if not unroll:
        return ce, reg
    # row p + 1 of the same answer reads est_p (kept in the graph: the first pass learns to
    # give estimates the second can read); an answer's first row keeps the target's
    pair = mask[:, 0, 1:, :-1].diagonal(dim1=1, dim2=2)  # [B, L - 1]: p, p + 1 in one answer
    g2 = torch.where(pair[..., None], est[:, :-1].float(), g_in[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est2 = head(emb[:, 1:], g2, pos[:, 1:], mask[:, :, 1:, 1:], norm_w)
    ce2, reg2 = _soft_ce(est2[pair], g_out[:, 1:][pair], sub_emb)
    return (ce + ce2) / 2, (reg + reg2) / 2


@torch.no_grad()
def agreement(head, batches: Batches, answers: list[int], norm_w, sub_emb, ids) -> dict:
    """Greedy agreement with the target over ``answers``: depth 1 (the target's features) and
    depth 2 (the head's own estimate of the row before, where depth 1 agreed)."""
    head.eval()
    hit1 = tot1 = hit2 = tot2 = 0
    for i in answers:
        emb, g_in, pos, mask, g_out, valid = batches.make([i])
        for r in range(emb.shape[0]):  # a long answer spans rows: each scored on its own
            n = int(valid[r].sum())
            e, g, p, o = emb[r:r + 1, :n], g_in[r:r + 1, :n], pos[r:r + 1, :n], g_out[r, :n]
            m = mask[r:r + 1, :, :n, :n]
            want = ids[(o @ sub_emb.T).argmax(-1)]
            est = head(e, g, p, m, norm_w)
            ok1 = ids[(est[0] @ sub_emb.T).argmax(-1)] == want
            # depth 2: row p + 1 reads the head's estimate of row p instead of the target's
            est2 = head(e[:, 1:], est[:, :-1], p[:, 1:], m[:, :, 1:, 1:], norm_w)
            ok2 = (ids[(est2[0] @ sub_emb.T).argmax(-1)] == want[1:]) & ok1[:-1]
            hit1, tot1 = hit1 + int(ok1.sum()), tot1 + n
            hit2, tot2 = hit2 + int(ok2.sum()), tot2 + int(ok1[:-1].sum())
    head.train()
    return {"depth1": round(hit1 / max(tot1, 1), 4), "depth2": round(hit2 / max(tot2, 1), 4)}


# ---------------------------------------------------------------------------------- export


def _names() -> dict[str, str]:
    """:class:`TrainHead` parameter -> the HF name of layer 0's tensor."""
    from pipespec_fast.models import hf_names

    return {"q.weight": hf_names.Q, "k.weight": hf_names.K, "v.weight": hf_names.V,
            "o.weight": hf_names.O, "gate.weight": hf_names.GATE, "up.weight": hf_names.UP,
            "down.weight": hf_names.DOWN, "n1": hf_names.ATTN_NORM, "n2": hf_names.FFN_NORM}


def load_head(head: TrainHead, folder: Path) -> None:
    """Continue from an exported head: its layer and fc into ``head``."""
    from safetensors.torch import load_file

    from pipespec_fast.models import hf_names
    from pipespec_fast.models.feature_head import FC_FILE

    sd = load_file(str(folder / "model.safetensors"))
    fc = load_file(str(folder / FC_FILE))
    state = {ours: sd[hf_names.layer(0, hf)].float() for ours, hf in _names().items()}
    state.update({"fc.weight": fc["fc.weight"].float(), "fc.bias": fc["fc.bias"].float()})
    head.load_state_dict(state)


def export(head: TrainHead, target_dir: Path, target, ids: torch.Tensor, out: Path,
           info: dict) -> None:
    """The head as a model folder: a one-layer LLaMA checkpoint over the subset (embedding
    rows and final norm: the target's), ``feature_head.safetensors`` (fc), the target's
    tokenizer files and ``training.json``."""
    from safetensors.torch import save_file

    from pipespec_fast.models import hf_names
    from pipespec_fast.models.checkpoint import save_state_dict
    from pipespec_fast.models.config import VOCAB_SUBSET_IDS, LlamaConfig
    from pipespec_fast.models.feature_head import CONFIG_KEY, FC_FILE

    cfg = json.loads((target_dir / "config.json").read_text())
    cfg.update(num_hidden_layers=1, vocab_subset_size=int(ids.numel()),
               tie_word_embeddings=True, torch_dtype="float16")
    cfg[CONFIG_KEY] = {"target": target_dir.name, "features": "final-norm output"}
    emb = target.tok_embeddings(torch.arange(target.config.vocab_size)).float()
    h = {k: v.detach().half() for k, v in head.state_dict().items()}
    names = _names()
    sd = {hf_names.EMBED: torch.cat([emb[ids], emb.mean(0, keepdim=True)]).half(),
          hf_names.FINAL_NORM: target.norm.weight.detach().half(), VOCAB_SUBSET_IDS: ids,
          **{hf_names.layer(0, hf): h[ours] for ours, hf in names.items()}}
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(out, sd, LlamaConfig.from_hf_dict(cfg))  # config.json: rewritten below
    save_file({"fc.weight": h["fc.weight"].contiguous(), "fc.bias": h["fc.bias"].contiguous()},
              str(out / FC_FILE))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy(target_dir / name, out / name)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    from pipespec_fast import FastPipeline
    from pipespec_fast.models.config import LlamaConfig
    from pipespec_fast.models.defaults import NGRAM_STORE_DIR, default_target_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the head's folder (written)")
    ap.add_argument("--tokens", type=int, default=800_000, help="answer tokens read")
    ap.add_argument("--minutes", type=float, default=30.0, help="training time")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--answers-per-batch", type=int, default=24)
    ap.add_argument("--noise", type=float, default=0.2, help="input feature noise (uniform)")
    ap.add_argument("--held-out", type=int, default=200, help="answers kept for evaluation")
    ap.add_argument("--features", help="a feature file (default: cached by settings)")
    ap.add_argument("--init", help="an exported head to continue from")
    ap.add_argument("--unroll", action="store_true",
                    help="also train on the head's own estimates (depth 2 and deeper)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    target_dir = default_target_dir()
    pipe = FastPipeline.from_default(draft=False, ngram=False)
    target = pipe.stages[-1].model
    path = Path(args.features) if args.features else \
        CACHE / f"{target_dir.name}-{args.tokens}-{args.seed}.pt"
    data = torch.load(path) if path.is_file() else \
        dump(pipe, store_answers(Path(NGRAM_STORE_DIR)), args.tokens, args.seed, path)
    from safetensors.torch import load_file

    from pipespec_fast.models.defaults import default_draft_dir

    # the distilled draft's subset: the target's 12288 most generated tokens on its data
    ids = load_file(str(default_draft_dir() / "model.safetensors"))["model.vocab_subset_ids"]
    with torch.inference_mode():
        emb = target.tok_embeddings(torch.arange(target.config.vocab_size)).float().clone()
    norm_w = target.norm.weight.detach().float().clone()
    sub_emb = emb[ids].contiguous()
    cfg = LlamaConfig.from_dir(target_dir)
    head = TrainHead(cfg)
    if args.init:
        load_head(head, Path(args.init))
    batches = Batches(data, emb, norm_w, cfg.rms_norm_eps)
    n_answers = len(data["off"]) - 1
    held = list(range(min(args.held_out, n_answers // 4)))
    train = list(range(len(held), n_answers))
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    history, step, t0 = [], 0, time.time()
    before = agreement(head, batches, held, norm_w, sub_emb, ids)
    while time.time() - t0 < args.minutes * 60:
        rng.shuffle(train)
        for c in range(0, len(train), args.answers_per_batch):
            frac = min(1.0, (time.time() - t0) / (args.minutes * 60))
            for pg in opt.param_groups:
                warm = min(1.0, (step + 1) / 50)
                pg["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
            ce, reg = losses(head, batches.make(train[c:c + args.answers_per_batch]), norm_w,
                             sub_emb, args.noise, args.unroll)
            opt.zero_grad()
            (ce + reg).backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 300 == 0:
                a = agreement(head, batches, held, norm_w, sub_emb, ids)
                history.append({"step": step, "minutes": round((time.time() - t0) / 60, 1),
                                "ce": round(ce.item(), 3), "reg": round(reg.item(), 4), **a})
                print(history[-1], flush=True)
            if frac >= 1.0:
                break
    final = agreement(head, batches, held, norm_w, sub_emb, ids)
    print("held-out agreement", final, flush=True)
    info = {"target": target_dir.name, "answers": n_answers, "tokens": int(data["off"][-1]),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "steps": step,
            "minutes": round((time.time() - t0) / 60, 1), "held_out_agreement_before": before,
            "held_out_agreement": final, "history": history}
    export(head, target_dir, target, ids, Path(args.out), info)


if __name__ == "__main__":
    main()
