"""``groupsparse prune-lm``: one-shot pruning of a local ``save_pretrained`` causal LM with calibration text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _check_dirs(model_dir: Path, calibration: Path | None, out: Path, force: bool) -> None:
    """Never write where we read: OUT may not be, contain or lie inside MODEL_DIR, nor hold the calibration file."""
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents or o in m.parents:
        raise ValueError(f"--out: got {str(out)!r}, which overlaps MODEL_DIR {str(model_dir)!r}; expected a separate folder")
    if calibration is not None and o in calibration.resolve().parents:
        raise ValueError(f"--out: got {str(out)!r}, which holds the calibration file; expected a separate folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ValueError(f"--out: got {str(out)!r}, which exists and is not an empty folder; expected a new folder (or --force)")
    # --force replaces the folder whole: only ever a previous prune-lm output, never e.g. a home folder given by mistake
    if force and out.is_dir() and any(out.iterdir()) and not (out / "sparsity_report.json").is_file():
        raise ValueError(f"--out: got {str(out)!r}, a non-empty folder that is not a prune-lm output (no "
                         "sparsity_report.json); --force replaces only those, expected a new or prune-lm folder")


@click.command("prune-lm")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt", "gsp", "owl"]), required=True)
@click.option("--sparsity", "-s", type=float, default=None, help="Unstructured zero fraction of every pruned Linear (or on average, for owl / gsp --group model).")
@click.option("--pattern", default=None, help="N:M pattern instead of --sparsity, e.g. 2:4 or 4:8.")
@click.option("--group", type=click.Choice(["row", "layer", "model"]), default=None, help="GSP comparison group (default layer).")
@click.option("--refit", is_flag=True, help="Refit kept weights on the calibration activations (SparseGPT sweep, mask fixed).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, help="Text: .txt, .jsonl or .jsonl.xz (field 'text').")
@click.option("--split", default=None, help="Keep only JSON lines whose 'split' equals this (e.g. train).")
@click.option("--n-samples", type=int, default=64, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration window offsets.")
@click.option("--exclude", multiple=True, help="Glob of block-relative Linear names to keep dense (repeatable).")
@click.option("--owl-m", type=float, default=5.0, show_default=True)
@click.option("--owl-lambda", type=float, default=0.08, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="New folder for the pruned model, tokenizer and sparsity_report.json.")
@click.option("--force", is_flag=True, help="Allow a non-empty --out folder (its files are replaced).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def prune_lm(ctx, model_dir, method, sparsity, pattern, group, refit, calibration, split, n_samples, seq_len, seed, exclude,
             owl_m, owl_lambda, threads, out, force, quiet):
    """Prune the decoder Linear layers of MODEL_DIR in one shot and save_pretrained the result to OUT."""
    import torch

    from .oneshot import check_options, prune_model, read_texts, sample_windows, token_stream
    from .oneshot.latency import semi_structured_latency
    from .oneshot.walker import find_blocks, linear_layers

    model_dir, out = Path(model_dir), Path(out)
    cal = Path(calibration) if calibration else None
    _check_dirs(model_dir, cal, out, force)
    if method != "magnitude" and cal is None:
        raise click.UsageError(f"--calibration is required for --method {method}")
    if n_samples < 1 or seq_len < 2:
        raise click.UsageError(f"got --n-samples {n_samples} --seq-len {seq_len}, expected >= 1 and >= 2")
    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads: got {threads}, expected a positive integer")
    try:  # before the model loads (minutes for a large one)
        check_options(method, sparsity, pattern, group, refit, exclude=tuple(exclude), owl_m=owl_m, owl_lambda=owl_lambda)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    if quiet:  # (Hugging Face's own loading and saving bars and notices too, for this command only)
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        ctx.call_on_close(lambda: (hf_logging.set_verbosity(verbosity),
                                   hf_logging.enable_progress_bar() if bars else None))

    # local folder only: nothing is downloaded, a missing file is an error
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ids = None
    tokenizer = None
    if cal is not None:
        docs = read_texts(cal, split=split)  # read first: a bad file fails before the tokenizer loads
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        stream = token_stream(docs, lambda s: tokenizer(s, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
        ids = sample_windows(stream, n_samples, seq_len, seed=seed)
    t0 = time.perf_counter()
    res = prune_model(model, ids, method=method, sparsity=sparsity, pattern=pattern, group=group, refit=refit,
                      owl_m=owl_m, owl_lambda=owl_lambda, exclude=tuple(exclude), progress=not quiet,
                      restore_on_error=False)  # nothing is saved on error: no CPU copy of the weights needed
    report = res.to_dict()
    report.update(model_dir=str(model_dir), calibration=str(cal) if cal else None, split=split, n_samples=n_samples,
                  seq_len=seq_len, seed=seed, wall_seconds=time.perf_counter() - t0,
                  dense_policy="embeddings, lm_head and everything outside the decoder blocks stay dense")
    if res.pattern == "2:4":
        blocks, _ = find_blocks(model)
        first = next(iter(linear_layers(blocks[0] if blocks is not None else model).values()))
        report["semi_structured_latency"] = semi_structured_latency(first)
    from ..io import atomic_folder

    with atomic_folder(out) as tmp:  # a kill leaves OUT as it was; --force swaps the old folder out last
        model.save_pretrained(tmp)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None  # a model folder without a tokenizer is still a model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "sparsity_report.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"{method} {res.pattern if res.sparsity is None else res.sparsity}: {len(res.layers)} layers, "
               f"{res.zero_fraction:.4f} zeros in pruned layers, {res.seconds:.1f} s -> {out}")


commands = [prune_lm]
