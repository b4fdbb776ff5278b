"""Train the bundled character-level LSTM on Python's standard library.

Usage::

    python -m deepbase_duck.models.train_charlstm --out deepbase_duck/models

Training data: the "train" split of :func:`deepbase_duck.corpora.stdlib.stdlib_files`,
files concatenated with "\\n" separators. Each step draws 32 random windows of
256 characters (plus one target character) and minimises next-character
cross-entropy with Adam (lr 2e-3, short linear warm-up then cosine decay to 10%),
gradient-norm clipping at 1.0. Every window starts from a zero LSTM state, as in
:meth:`CharLSTM.forward`.

Evaluation: mean cross-entropy in nats/char on a fixed sample of held-out text
(evenly spaced windows of the held-out split).

Outputs in ``--out``: ``charlstm_step0.safetensors`` (untrained init, float16),
``charlstm_early.safetensors`` and ``charlstm_mid.safetensors`` (about 10% and
35% of training, float16), ``charlstm_final.safetensors`` (float32) and
``charlstm.json`` describing the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from deepbase_duck.corpora.stdlib import is_heldout, read_source, stdlib_files
from deepbase_duck.models.charlstm import (
    CHECKPOINTS,
    CONFIG_FILENAME,
    VOCAB_DESCRIPTION,
    VOCAB_SIZE,
    CharLSTM,
    encode_chars,
)


def _corpus(files: list[str]) -> torch.Tensor:
    text = "\n".join(read_source(f) for f in files)
    return torch.tensor(encode_chars(text), dtype=torch.uint8)


def _eval_windows(data: torch.Tensor, n_windows: int, length: int) -> torch.Tensor:
    """Fixed, evenly spaced windows of ``length + 1`` ids from ``data``."""
    span = length + 1
    last = len(data) - span
    if last < 0:
        raise ValueError("held-out corpus too small for the evaluation sample")
    starts = [round(i * last / max(n_windows - 1, 1)) for i in range(n_windows)]
    return torch.stack([data[s : s + span] for s in starts]).long()


@torch.no_grad()
def evaluate(model: CharLSTM, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-character cross-entropy (nats/char) over ``windows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_stats(train: torch.Tensor, heldout: torch.Tensor) -> tuple[float, float]:
    """(entropy of the training unigram distribution, its cross-entropy on held-out), nats."""
    counts = torch.bincount(train.long(), minlength=VOCAB_SIZE).double()
    probs = (counts + 1.0) / (counts.sum() + VOCAB_SIZE)  # add-one smoothing
    entropy = float(-(probs * probs.log()).sum())
    h_counts = torch.bincount(heldout.long(), minlength=VOCAB_SIZE).double()
    cross = float(-(h_counts * probs.log()).sum() / h_counts.sum())
    return entropy, cross


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _state(model: CharLSTM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}


def _save(model: CharLSTM, path: pathlib.Path, dtype: torch.dtype, eval_windows, arch) -> dict:
    """Save ``model`` in ``dtype``; return info incl. held-out loss of the saved weights."""
    from safetensors.torch import save_file

    state = _state(model, dtype)
    save_file(state, str(path), metadata={"format": "pt", "dtype": str(dtype)})
    # Evaluate exactly what was saved (after the dtype round trip).
    probe = CharLSTM(**arch)
    probe.load_state_dict({k: v.float() for k, v in state.items()})
    loss = evaluate(probe, eval_windows)
    return {
        "file": path.name,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes": path.stat().st_size,
        "heldout_loss": round(loss, 5),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="deepbase_duck/models", help="output directory")
    ap.add_argument("--steps", type=int, default=1200, help="number of optimisation steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows for evaluation")
    ap.add_argument("--eval-len", type=int, default=512, help="characters per held-out window")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--time-only", type=int, default=0, metavar="N",
        help="only time N training steps (no files written) and exit",
    )
    args = ap.parse_args(argv)

    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = "python -m deepbase_duck.models.train_charlstm " + shlex.join(argv_used)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    files = stdlib_files()
    train_files = [f for f in files if not is_heldout(f)]
    heldout_files = [f for f in files if is_heldout(f)]
    files_sha = hashlib.sha256("\n".join(train_files).encode("utf-8")).hexdigest()
    train = _corpus(train_files)
    heldout = _corpus(heldout_files)
    eval_windows = _eval_windows(heldout, args.eval_windows, args.eval_len)
    print(
        f"train: {len(train_files)} files, {len(train):,} chars | "
        f"held-out: {len(heldout_files)} files, {len(heldout):,} chars | "
        f"eval sample: {eval_windows.shape[0]}x{args.eval_len} chars",
        flush=True,
    )
    unk_frac = float((train == 0).double().mean())
    uni_entropy, uni_cross = unigram_stats(train, heldout)
    print(
        f"unigram entropy (train) {uni_entropy:.4f} nats/char; unigram cross-entropy on "
        f"held-out {uni_cross:.4f}; log(V) = {math.log(VOCAB_SIZE):.4f}; unknown-char fraction {unk_frac:.2e}",
        flush=True,
    )

    arch = {"vocab_size": VOCAB_SIZE, "embed_dim": args.embed_dim, "hidden": args.hidden}
    model = CharLSTM(**arch)  # initialised right after manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    span = args.seq_len + 1
    max_start = len(train) - span
    offsets = torch.arange(span)

    def batch() -> torch.Tensor:
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen)
        return train[starts[:, None] + offsets].long()

    def train_step(step: int, total: int) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup)
        w = batch()
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        return loss.item()

    if args.time_only:
        model.train()
        train_step(0, args.time_only)  # warm-up, not timed
        t0 = time.perf_counter()
        for s in range(args.time_only):
            train_step(s, args.time_only)
        dt = (time.perf_counter() - t0) / args.time_only
        t0 = time.perf_counter()
        evaluate(model, eval_windows)
        print(f"step time {dt:.3f} s/step; one evaluation {time.perf_counter() - t0:.2f} s", flush=True)
        return 0

    total = args.steps
    ckpt_steps = {
        "step0": 0,
        "early": max(1, round(0.10 * total)),
        "mid": max(2, round(0.35 * total)),
        "final": total,
    }
    ckpt_dtype = {"step0": torch.float16, "early": torch.float16, "mid": torch.float16, "final": torch.float32}
    checkpoints: dict[str, dict] = {}
    history: list[dict] = []

    def save(name: str, step: int) -> None:
        info = _save(model, out / CHECKPOINTS[name], ckpt_dtype[name], eval_windows, arch)
        info.update(step=step, chars_seen=step * args.batch * args.seq_len)
        checkpoints[name] = info
        print(f"  saved {name} at step {step}: held-out loss {info['heldout_loss']:.4f} ({info['bytes']:,} bytes)", flush=True)

    save("step0", 0)
    by_step = {s: n for n, s in ckpt_steps.items() if n != "step0"}
    model.train()
    t_start = time.perf_counter()
    train_time = 0.0
    running = None
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        loss = train_step(step - 1, total)
        train_time += time.perf_counter() - t0
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % args.log_every == 0 or step == 1:
            el = time.perf_counter() - t_start
            eta = el / step * (total - step)
            print(
                f"step {step}/{total} loss {loss:.4f} (ema {running:.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {train_time / step:.3f}s/step "
                f"elapsed {el / 60:.1f}m eta {eta / 60:.1f}m",
                flush=True,
            )
        if step in by_step:
            save(by_step[step], step)
        elif step % args.eval_every == 0:
            h = evaluate(model, eval_windows)
            history.append({"step": step, "heldout_loss": round(h, 5)})
            print(f"  eval step {step}: held-out loss {h:.4f} nats/char", flush=True)
        if step in by_step:
            history.append({"step": step, "heldout_loss": checkpoints[by_step[step]]["heldout_loss"]})
    wall = time.perf_counter() - t_start

    final = checkpoints["final"]["heldout_loss"]
    print(
        f"done: {total} steps in {wall / 60:.1f} min ({train_time / total:.3f} s/step); held-out loss "
        f"final {final:.4f} vs step0 {checkpoints['step0']['heldout_loss']:.4f} vs unigram "
        f"{uni_cross:.4f} (train unigram entropy {uni_entropy:.4f}) nats/char",
        flush=True,
    )

    record = {
        "model": "CharLSTM",
        "description": "2-layer character-level LSTM language model trained on Python standard-library source",
        "architecture": {
            **arch,
            "layers": ["embed", "lstm0", "lstm1", "head"],
            "num_lstm_layers": 2,
            "n_parameters": n_params,
        },
        "vocab": {
            "size": VOCAB_SIZE,
            "description": VOCAB_DESCRIPTION,
            "unknown_id": 0,
        },
        "corpus": {
            "name": "python-stdlib",
            "python_version": platform.python_version(),
            "split_rule": "held out iff sha256(relpath.encode('utf-8')).digest()[0] < 26",
            "n_train_files": len(train_files),
            "train_files_sha256": files_sha,
            "train_files_sha256_of": "'\\n'.join(sorted training relpaths) encoded as utf-8",
            "n_heldout_files": len(heldout_files),
            "train_chars": len(train),
            "heldout_chars": len(heldout),
            "unknown_char_fraction_train": unk_frac,
        },
        "training": {
            "steps": total,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "chars_seen": total * args.batch * args.seq_len,
            "optimizer": "Adam",
            "lr": args.lr,
            "lr_schedule": f"linear warm-up {args.warmup} steps, cosine decay to 10% of lr",
            "grad_clip": args.clip,
            "seed": args.seed,
            "threads": args.threads,
            "wall_time_s": round(wall, 1),
            "step_time_s": round(train_time / total, 4),
            "torch_version": torch.__version__,
        },
        "evaluation": {
            "metric": "mean next-character cross-entropy, nats/char, zero initial state per window",
            "sample": f"{eval_windows.shape[0]} evenly spaced windows of {args.eval_len}+1 chars "
            "from the concatenated held-out split",
            "unigram_entropy_train": round(uni_entropy, 5),
            "unigram_cross_entropy_heldout": round(uni_cross, 5),
            "log_vocab_size": round(math.log(VOCAB_SIZE), 5),
            "history": history,
        },
        "checkpoints": checkpoints,
        "command": command,
    }
    with open(out / CONFIG_FILENAME, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    print(f"wrote {out / CONFIG_FILENAME}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
