"""Prune the LM trained by ``lm_train`` with every one-shot method and measure test perplexity, time and memory.

    python -m groupsparse.experiments.lm_eval --model runs/lm/model --results results/prune/lm --threads 2

Each (method, pattern) row prunes a freshly loaded copy; its peak memory is the kernel's peak RSS (VmHWM, reset
just before pruning) and it writes ``RESULTS/rows/<row>.json`` atomically: a killed evaluation resumes at the
first missing row (``--subprocess`` runs each row in its own process instead). Calibration: 64 windows of 256
tokens at seeded random offsets of the *train* split. Perplexity: non-overlapping 256-token windows of the
*test* split; ``--test-stride 3`` (default) takes every third one, a third of the test tokens from every
document. ``--aggregate`` (also run at the end) writes ``lm_prune.csv``, ``lm_prune.json``,
``lm_allocation.json`` and ``lm_prune.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..io import atomic_path

# (row id, prune_model keywords); ordered so that a run cut short still covers 50 % and 2:4 for every method
UNSTRUCTURED = [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("owl", {}),
                ("gsp-layer", {"method": "gsp", "group": "layer"}), ("gsp-model", {"method": "gsp", "group": "model"}),
                ("gsp-model-refit", {"method": "gsp", "group": "model", "refit": True}),
                ("wanda-refit", {"method": "wanda", "refit": True})]
NM = [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("gsp-layer", {"method": "gsp", "group": "layer"}),
      ("gsp-refit", {"method": "gsp", "group": "layer", "refit": True})]


def all_rows() -> list[tuple[str, dict]]:
    rows = [("dense", {})]
    for setting in ("0.5", "2:4", "0.7", "0.6", "4:8"):
        for name, kw in (NM if ":" in setting else UNSTRUCTURED):
            kw = {"method": name.split("-")[0], **kw}
            kw.update({"pattern": setting} if ":" in setting else {"sparsity": float(setting)})
            rows.append((f"{name}@{setting}", kw))
    return rows


def _cache(args) -> Path:
    """Calibration ids and test windows, tokenized once for all rows."""
    path = Path(args.model).parent / f"eval_cache_{args.n_calib}x{args.seq}_s{args.seed}_t{args.test_stride}.pt"
    if path.exists():
        return path
    from transformers import AutoTokenizer

    from ..prune.oneshot import chunk_windows, read_texts, sample_windows, token_stream

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    calib = sample_windows(token_stream(read_texts(args.data, split="train"), enc, tok.eos_token_id), args.n_calib,
                           args.seq, seed=args.seed)
    test = chunk_windows(token_stream(read_texts(args.data, split="test"), enc, tok.eos_token_id), args.seq)
    test = test[:: args.test_stride]  # every k-th window: spread over all test documents, k times cheaper
    with atomic_path(path, writer_errors=True) as tmp:
        torch.save({"calib": calib, "test": test}, tmp)
    return path


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak measured next is the pruning's, not the loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(args, row: str) -> None:
    from transformers import AutoModelForCausalLM

    from ..prune.oneshot import prune_model
    from .lm_train import perplexity

    torch.set_num_threads(args.threads)
    kw = dict(all_rows())[row]
    data = torch.load(_cache(args))
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    before = _status_mb("VmRSS")
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result = prune_model(model, data["calib"], progress=False, **kw) if kw else None
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: robust to a loaded machine
    # VmHWM since the reset; without it (not Linux) the process peak, loading included
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"row": row, "method": row.split("@")[0], "setting": row.split("@")[1] if "@" in row else "dense",
           "prune_s": seconds, "prune_cpu_s": cpu, "peak_rss_mb": peak, "rss_before_prune_mb": before,
           "prune_peak_over_model_mb": max(peak - before, 0.0), "threads": args.threads,
           "zero_fraction": result.zero_fraction if result else 0.0, "test_ppl": perplexity(model, data["test"])}
    res = Path(args.results)
    for sub, obj in (("rows", out), ("reports", result.to_dict() if result else None)):
        if obj is None:
            continue
        (res / sub).mkdir(parents=True, exist_ok=True)
        p = res / sub / f"{row.replace(':', '-').replace('@', '_')}.json"
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(obj, indent=1) + "\n")
    print(json.dumps(out), flush=True)


def cpu_times(args, rows: list[str]) -> None:
    """Pruning CPU time only (no perplexity), one thread, for ``rows``: ``RESULTS/lm_cpu_times.json``."""
    from transformers import AutoModelForCausalLM

    from ..prune.oneshot import prune_model

    torch.set_num_threads(1)
    data = torch.load(_cache(args))
    table = dict(all_rows())
    out = {}
    for row in rows:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        c0 = time.process_time()
        prune_model(model, data["calib"], progress=False, **table[row])
        out[row] = time.process_time() - c0
        print(row, f"{out[row]:.1f} s CPU", flush=True)
    (Path(args.results) / "lm_cpu_times.json").write_text(json.dumps({"threads": 1, "cpu_s": out}, indent=1) + "\n")


def aggregate(args) -> None:
    res = Path(args.results)
    rows = [json.loads(p.read_text()) for p in sorted((res / "rows").glob("*.json"))]
    order = {r: i for i, (r, _) in enumerate(all_rows())}
    rows.sort(key=lambda r: order.get(r["row"], 1e9))
    keys = ["row", "method", "setting", "zero_fraction", "test_ppl", "prune_s", "prune_cpu_s", "peak_rss_mb",
            "prune_peak_over_model_mb"]
    with open(res / "lm_prune.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (res / "lm_prune.json").write_text(json.dumps(rows, indent=1) + "\n")
    alloc = {}
    for p in sorted((res / "reports").glob("*.json")):
        rep = json.loads(p.read_text())
        if rep.get("blocks"):
            alloc[p.stem] = {"blocks": rep["blocks"],
                             "layers": {f"{e['block']}.{e['name']}": e["zero_fraction"] for e in rep["layers"]}}
    (res / "lm_allocation.json").write_text(json.dumps(alloc, indent=1) + "\n")
    from .lm_plot import plot

    plot(rows, alloc, res / "lm_prune.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/lm/model")
    ap.add_argument("--data", default="../shared/data/python-docs-3.11.jsonl.xz")
    ap.add_argument("--results", default="results/prune/lm")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-stride", type=int, default=3, help="perplexity on every k-th test window (1: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", default=None, help="run this single row in this process (used by the driver)")
    ap.add_argument("--only", nargs="*", default=None, help="row ids to run (default all, in order)")
    ap.add_argument("--aggregate", action="store_true", help="only aggregate existing rows")
    ap.add_argument("--subprocess", action="store_true", help="one process per row (default: all rows in this one)")
    ap.add_argument("--cpu-times", nargs="*", default=None, help="only measure pruning CPU time of these rows")
    args = ap.parse_args(argv)
    if args.cpu_times:
        return cpu_times(args, args.cpu_times)
    if args.one:
        return run_one(args, args.one)
    if not args.aggregate:
        _cache(args)
        done = {json.loads(p.read_text())["row"] for p in (Path(args.results) / "rows").glob("*.json")} \
            if (Path(args.results) / "rows").exists() else set()
        for row, _ in all_rows():
            if row in done or (args.only and row not in args.only):
                continue
            if not args.subprocess:
                try:
                    run_one(args, row)
                except Exception as e:  # one failed row must not stop the others; it is retried on the next run
                    print(f"{row} failed: {type(e).__name__}: {e}", flush=True)
                continue
            cmd = [sys.executable, "-m", "groupsparse.experiments.lm_eval", "--one", row,
                   "--model", args.model, "--data", args.data, "--results", args.results, "--threads", str(args.threads),
                   "--n-calib", str(args.n_calib), "--seq", str(args.seq), "--seed", str(args.seed), "--test-stride", str(args.test_stride)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else
                  f"{row} failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
    aggregate(args)


if __name__ == "__main__":
    main()
