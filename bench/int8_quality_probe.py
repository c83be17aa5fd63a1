"""Probe: what int8 activations cost the default target's predictions, before the int8 mode is
wired into the fused layer stack.

The model runs through its torch layers (``fused=False``), so every matmul goes through
``Linear.forward``, which uses the packed weights: the exact packed product (the exact mode's
arithmetic), or, patched here, :func:`pipespec_fast.cpu.int8.int8_linear` on the same packed
weights. Attention, norms and everything else are identical in both runs. Texts are this
repository's docs and sources (held out from the model's training, not a benchmark), cut into
windows of 256 tokens and scored teacher-forced. Prints the mean per-token NLL of each mode,
the relative change and how often the two modes' argmax agrees on the same prefix.

    PIPESPEC_CACHE=... .venv/bin/python bench/int8_quality_probe.py [--window 256] [--files 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipespec_fast import config  # noqa: E402
from pipespec_fast.cpu import int8  # noqa: E402
from pipespec_fast.cpu import linear as cpu_linear  # noqa: E402
from pipespec_fast.kv_cache import KVCache  # noqa: E402


def windows(tokenizer, files: list[Path], size: int, per_file: int = 4) -> list[list[int]]:
    out = []
    for f in files:
        ids = tokenizer.encode(f.read_text()).ids
        for s in range(0, min(len(ids), per_file * size), size):
            if len(ids[s:s + size]) >= 64:
                out.append(ids[s:s + size])
    return out


def int8_forward(original):
    """``Linear.forward`` with the packed product replaced by the int8 one where it applies."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if p is not None and x.dtype == torch.float32 and int8.supports(p):
            flat = x.reshape(-1, x.shape[-1])
            return int8.int8_linear(flat, p, 2).reshape(*x.shape[:-1], p.m)
        return original(self, x)
    return forward


def score(model, texts: list[list[int]]) -> tuple[float, torch.Tensor]:
    """Mean NLL per predicted token and the argmax of every prediction."""
    cfg, nll, count, preds = model.config, 0.0, 0, []
    for ids in texts:
        cache = KVCache(cfg.n_layers, cfg.n_kv_heads, len(ids), cfg.head_dim)
        logits = model(torch.tensor(ids), cache)[:-1].double()
        target = torch.tensor(ids[1:])
        nll -= torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
        count += len(ids) - 1
        preds.append(logits.argmax(-1))
    return nll / count, torch.cat(preds)


def main(argv=None) -> None:
    from tokenizers import Tokenizer

    from pipespec_fast.models.defaults import default_target_dir
    from pipespec_fast.models.llama import Transformer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--files", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder = default_target_dir()
    files = (sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "pipespec_fast").glob(
        "*.py")))[: args.files]
    texts = windows(Tokenizer.from_file(str(folder / "tokenizer.json")), files, args.window)
    print(f"{len(texts)} windows, {sum(map(len, texts))} tokens, int8 path {int8.isa()}")
    original = cpu_linear.Linear.forward
    with config.use(config.current().replace(fused=False)):
        model = Transformer.from_pretrained(folder)
        exact = score(model, texts)
        cpu_linear.Linear.forward = int8_forward(original)
        try:
            quantised = score(model, texts)
        finally:
            cpu_linear.Linear.forward = original
    print(f"mean NLL: exact {exact[0]:.5f}, int8 {quantised[0]:.5f} "
          f"({100 * (quantised[0] - exact[0]) / exact[0]:+.3f}%)")
    print(f"argmax agreement on the same prefixes: "
          f"{(exact[1] == quantised[1]).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
