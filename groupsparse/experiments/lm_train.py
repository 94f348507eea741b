"""Train a small Llama-architecture causal LM on the Python 3.11 docs corpus, resumably, on a CPU.

    python -m groupsparse.experiments.lm_train --data ../shared/data/python-docs-3.11.jsonl.xz --run runs/lm \
        --results results/prune/lm --budget-min 60

A byte-level BPE tokenizer (``tokenizers``, vocab 4096) is trained on the train split only. The learning rate
follows a cosine over a *time* budget (training seconds, saved in the checkpoint) so that a run cut short by a
deadline still ends annealed, and a killed run resumes where its last checkpoint stopped. A checkpoint is one
``torch.save`` file (model, optimizer, RNG states, step, tokens, train seconds) written to a temporary name and
moved into place (:func:`groupsparse.io.atomic_path`), so a kill never leaves a half-written checkpoint. At the end the model and
tokenizer are written with ``save_pretrained`` to ``RUN/model`` and the test perplexity to
``RESULTS/lm_model.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

from ..io import atomic_path
from ..prune.oneshot.calibration import chunk_windows, read_texts, token_stream

EOS = "<|endoftext|>"


def train_tokenizer(docs, vocab_size: int, out_dir: Path):
    """Byte-level BPE on ``docs`` (the train split), saved as a ``PreTrainedTokenizerFast`` in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    fast.save_pretrained(out_dir)
    return fast


def load_splits(data, tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return {sp: token_stream(read_texts(data, split=sp), enc, tokenizer.eos_token_id) for sp in ("train", "validation", "test")}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp of the mean next-token loss over every predicted token of ``windows`` (n, L)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def build_model(vocab: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg)


def atomic_save(obj, path: Path):
    with atomic_path(path, writer_errors=True) as tmp:
        torch.save(obj, tmp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/python-docs-3.11.jsonl.xz")
    ap.add_argument("--run", default="runs/lm")
    ap.add_argument("--results", default="results/prune/lm")
    ap.add_argument("--budget-min", type=float, default=60.0, help="training minutes the LR cosine spans")
    ap.add_argument("--stop-at", default=None, help="UTC wall time HH:MM after which training stops regardless")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every-s", type=float, default=180.0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, res = Path(args.run), Path(args.results)
    run.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    tok_dir, ckpt_path, log_path = run / "tokenizer", run / "checkpoint.pt", res / "lm_train_log.csv"

    from transformers import PreTrainedTokenizerFast

    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(read_texts(args.data, split="train"), args.vocab, tok_dir)
    data = load_splits(args.data, tokenizer)
    print({k: v.numel() for k, v in data.items()}, "tokens", flush=True)
    val = chunk_windows(data["validation"], args.seq)[:48]

    torch.manual_seed(args.seed)
    model = build_model(len(tokenizer), args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"step": 0, "tokens": 0, "train_s": 0.0}
    gen = torch.Generator().manual_seed(args.seed)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["rng"])
        print(f"resumed at step {state['step']} ({state['tokens']} tokens, {state['train_s']:.0f} s)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    budget = args.budget_min * 60
    stop_at = None
    if args.stop_at:
        hh, mm = map(int, args.stop_at.split(":"))
        now = time.gmtime()
        stop_at = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    new_log = not log_path.exists()
    logf = open(log_path, "a", newline="")
    log = csv.writer(logf)
    if new_log:
        log.writerow(["step", "tokens", "train_s", "lr", "train_loss", "val_loss"])
    train = data["train"]
    last_ckpt = time.time()
    model.train()
    warm = 0.03 * budget
    while state["train_s"] < budget and (stop_at is None or time.time() < stop_at):
        t0 = time.time()
        frac = state["train_s"] / budget
        lr = args.lr * (state["train_s"] / warm if state["train_s"] < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += x.numel()
        state["train_s"] += time.time() - t0
        vl = ""
        if state["step"] % args.eval_every == 0:
            vl = f"{math.log(perplexity(model, val)):.4f}"
            print(f"step {state['step']} tokens {state['tokens']} t {state['train_s']:.0f}s lr {lr:.2e} "
                  f"loss {loss.item():.3f} val {vl}", flush=True)
        if state["step"] % 10 == 0 or vl:
            log.writerow([state["step"], state["tokens"], f"{state['train_s']:.1f}", f"{lr:.3e}", f"{loss.item():.4f}", vl])
            logf.flush()
        if time.time() - last_ckpt > args.ckpt_every_s:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "gen": gen.get_state(),
                         "rng": torch.get_rng_state(), "args": vars(args)}, ckpt_path)
            last_ckpt = time.time()
    atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "gen": gen.get_state(),
                 "rng": torch.get_rng_state(), "args": vars(args)}, ckpt_path)
    logf.close()
    out = run / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    test = chunk_windows(data["test"], args.seq)
    t0 = time.time()
    summary = {"params": n_params, "non_embedding_params": n_params - model.model.embed_tokens.weight.numel(),
               "config": {k: getattr(args, k) for k in ("vocab", "hidden", "intermediate", "layers", "seq", "batch", "lr")},
               "steps": state["step"], "tokens_seen": state["tokens"], "train_minutes": state["train_s"] / 60,
               "train_tokens_available": int(data["train"].numel()), "test_tokens": int(test[:, 1:].numel()),
               "val_ppl": perplexity(model, chunk_windows(data["validation"], args.seq)),
               "test_ppl": perplexity(model, test), "threads": args.threads, "model_dir": str(out)}
    summary["eval_s"] = time.time() - t0
    (res / "lm_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
