"""Train the bundled SQL autocompletion LSTM on queries from the SQL grammar generator.

Usage::

    python -m deepbase_duck.models.train_sqllstm --out deepbase_duck/models --max-seconds 420

Training data: ``sql_queries(n_train, seed=0)`` (:mod:`deepbase_duck.corpora.sqlgen`), one query
per line. Each step draws ``batch`` windows of ``seq_len + 1`` characters that start at the
beginning of a random query (inspection also runs every query from a zero state) and minimises
next-character cross-entropy with Adam (linear warm-up, cosine decay to 10%), gradient-norm
clipping at 1.0. Training stops after ``--steps`` steps or ``--max-seconds`` of wall time,
whichever comes first (the cosine schedule follows whichever is further along, so a shared, busy
CPU gives fewer steps but the same schedule shape).

Held-out evaluation: queries drawn with another seed, minus any that also occur in the training
corpus; each query is scored from a zero state on its characters after the first plus the closing
newline (mean nats per predicted character). The unigram entropy of the training corpus is
recorded beside it as the baseline a model must beat.

Outputs in ``--out``: ``sqllstm.safetensors`` (float32) and ``sqllstm.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from deepbase_duck.corpora.sqlgen import sql_queries
from deepbase_duck.models.charlstm import VOCAB_DESCRIPTION, VOCAB_SIZE, CharLSTM, encode_chars
from deepbase_duck.models.sqllstm import CONFIG_FILENAME, WEIGHTS_FILENAME

HELDOUT_SEED = 1000


def unigram_entropy(text: str) -> float:
    """Entropy (nats/char) of the character distribution of ``text`` (no smoothing)."""
    counts = np.bincount(np.frombuffer(text.encode("utf-32-le"), np.uint32)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def heldout_loss(model: CharLSTM, queries: list[str], batch: int = 64) -> float:
    """Mean next-character cross-entropy (nats/char) over ``queries``, each from a zero state,
    predicting every character after the first and the closing newline."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(queries), batch):
        ids = [encode_chars(q + "\n") for q in queries[i:i + batch]]
        width = max(map(len, ids))
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width - 1, dtype=torch.bool)
        for r, seq in enumerate(ids):
            x[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq) - 1] = True
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        total += float(ce[mask.reshape(-1)].sum())
        count += int(mask.sum())
    model.train(was)
    return total / count


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``floor * base``; progress is the larger of the step
    fraction and ``elapsed`` (the fraction of the time budget used), so a run cut short by its time
    budget still ends at the low learning rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = max((step - warmup) / max(total - warmup, 1), elapsed)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="deepbase_duck/models")
    ap.add_argument("--n-train", type=int, default=30_000, help="training queries")
    ap.add_argument("--n-heldout", type=int, default=600, help="held-out queries drawn")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-seconds", type=float, default=420.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    command = "python -m deepbase_duck.models.train_sqllstm " + shlex.join(sys.argv[1:] if argv is None else argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_q = sql_queries(args.n_train, seed=args.seed)
    seen = set(train_q)
    drawn = sql_queries(args.n_heldout, seed=HELDOUT_SEED)
    heldout_q = [q for q in drawn if q not in seen]
    text = "".join(q + "\n" for q in train_q)
    data = torch.tensor(encode_chars(text), dtype=torch.uint8)
    starts = np.cumsum([0] + [len(q) + 1 for q in train_q[:-1]])
    span = args.seq_len + 1
    starts = torch.tensor(starts[starts + span <= len(data)])
    uni = unigram_entropy(text)
    print(f"train: {len(train_q):,} queries, {len(text):,} chars | held-out: {len(heldout_q)} of {len(drawn)} "
          f"drawn (others occur in training) | unigram entropy {uni:.4f} nats/char", flush=True)

    arch = {"vocab_size": VOCAB_SIZE, "embed_dim": args.embed_dim, "hidden": args.hidden}
    model = CharLSTM(**arch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    offsets = torch.arange(span)
    history = [{"step": 0, "heldout_loss": round(heldout_loss(model, heldout_q), 5)}]
    t0 = time.time()
    step = 0
    model.train()
    while step < args.steps and time.time() - t0 < args.max_seconds:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, elapsed=(time.time() - t0) / args.max_seconds)
        w = data[starts[torch.randint(0, len(starts), (args.batch,), generator=gen)][:, None] + offsets].long()
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            h = heldout_loss(model, heldout_q)
            history.append({"step": step, "heldout_loss": round(h, 5), "train_loss": round(loss.item(), 5),
                            "seconds": round(time.time() - t0, 1)})
            print(f"step {step}  train {loss.item():.4f}  held-out {h:.4f}  {time.time() - t0:.0f} s", flush=True)
    wall = time.time() - t0

    from safetensors.torch import save_file
    path = out / WEIGHTS_FILENAME
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    final = heldout_loss(model, heldout_q)
    record = {
        "model": "CharLSTM",
        "description": "2-layer character-level LSTM autocompleting SQL queries generated from a grammar",
        "architecture": {**arch, "layers": ["embed", "lstm0", "lstm1", "head"],
                         "n_parameters": sum(p.numel() for p in model.parameters())},
        "vocab": {"size": VOCAB_SIZE, "description": VOCAB_DESCRIPTION, "unknown_id": 0},
        "corpus": {"generator": "deepbase_duck.corpora.sqlgen.sql_queries", "train_seed": args.seed,
                   "n_train": len(train_q), "train_chars": len(text), "heldout_seed": HELDOUT_SEED,
                   "n_heldout_drawn": len(drawn), "n_heldout": len(heldout_q)},
        "training": {"steps": step, "batch": args.batch, "seq_len": args.seq_len, "optimizer": "Adam",
                     "lr": args.lr, "warmup": args.warmup, "lr_schedule": f"cosine over {args.steps} steps or {args.max_seconds} s, whichever ends first",
                     "grad_clip": args.clip, "seed": args.seed, "threads": args.threads,
                     "chars_seen": step * args.batch * args.seq_len, "wall_time_s": round(wall, 1),
                     "torch_version": torch.__version__, "python": platform.python_version()},
        "evaluation": {"metric": "mean next-character cross-entropy (nats/char) per held-out query, zero state",
                       "heldout_loss": round(final, 5), "unigram_entropy_train": round(uni, 5),
                       "log_vocab_size": round(math.log(VOCAB_SIZE), 5), "history": history},
        "file": {"name": WEIGHTS_FILENAME, "bytes": path.stat().st_size, "dtype": "float32"},
        "command": command,
    }
    (out / CONFIG_FILENAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"saved {path} ({path.stat().st_size:,} bytes); held-out loss {final:.4f} nats/char "
          f"(unigram entropy {uni:.4f}); {step} steps in {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
