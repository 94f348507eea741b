"""``groupsparse prune`` and ``groupsparse report`` (registered by groupsparse.cli through ``commands``)."""

from __future__ import annotations

import json

import click

from .datasets import DATASETS
from .models import MODELS
from .config import METHODS, PROTOCOLS, VALUES, VECTORS


@click.command("prune")
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@click.option("--model", type=click.Choice(MODELS), default="mlp", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="gsp", show_default=True,
              help="gsp: induced GSP then magnitude finalization; gsp-single-shot: one projection of the dense "
                   "model; magnitude: global magnitude; gmp: gradual magnitude (cubic, Zhu & Gupta); deephoyer: "
                   "Hoyer-Square regularizer (lambda chosen on the validation split) then magnitude; random: "
                   "per-layer random masks (a floor).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="after", show_default=True,
              help="after: prune the trained dense model; during (gsp/gmp/deephoyer, the authors'): shape the "
                   "weights inside the dense run from --start-epoch at the training learning rate.")
@click.option("--sparsity", "-s", type=float, default=0.95, show_default=True,
              help="Target ZERO FRACTION of the final model over all Conv/Linear weights, for every method "
                   "(not a Hoyer sparsity; see --gsp-sparsity).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
              help="Run folder: manifest.json, report.json, model.safetensors, checkpoints. Rerunning the same "
                   "command resumes it; a folder of a run with other settings is refused.")
@click.option("--overwrite", is_flag=True, help="Replace a run folder that holds a run with other settings.")
@click.option("--data", type=click.Path(), default=None,
              help="cifar10 only: cifar-10-batches-py dir or tarball, image-folder tree or zip, or decoded .npz.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
@click.option("--epochs", type=int, default=None, help="Dense training epochs [digits 30, cifar10 30].")
@click.option("--finetune-epochs", type=int, default=None,
              help="Epochs after the dense model, the same for every method [digits 20, cifar10 15].")
@click.option("--induce-epochs", type=int, default=None,
              help="gsp/gmp/deephoyer, --protocol after: the part of --finetune-epochs spent shaping [half].")
@click.option("--start-epoch", type=int, default=None,
              help="--protocol during: the dense epoch the shaping starts at [half of --epochs].")
@click.option("--gsp-sparsity", type=float, default=None,
              help="Hoyer target of the GSP projection [from --sparsity by REFERENCE.md §3's table, e.g. "
                   "0.80->0.675, 0.90->0.7778, 0.95->0.86, 0.98->0.925].")
@click.option("--vectors", type=click.Choice(VECTORS), default=None,
              help="gsp: how a weight is cut into vectors [fan_out, the authors' CIFAR mode].")
@click.option("--scope", type=click.Choice(["layer", "model"]), default=None,
              help="gsp: each layer its own group, or one model-wide group [layer].")
@click.option("--normalize", type=click.Choice(["vector", "layer"]), default=None,
              help="gsp --scope model: rescale vectors or layers before the projection.")
@click.option("--values", type=click.Choice(VALUES), default=None,
              help="gsp: what the kept weights hold after the masks: projected, dense (pre-projection values) or "
                   "rescaled (projected, refit per vector) [projected].")
@click.option("--gsp-every", type=int, default=None,
              help="gsp/gmp: project (or prune) every k iterations [a third of an epoch].")
@click.option("--hoyer-lambda", type=float, default=None,
              help="deephoyer: regularizer weight [chosen on the validation split among digits 5e-5/2e-4/1e-3, "
                   "cifar10 3e-6/1e-5/3e-5].")
@click.option("--batch-size", type=int, default=None, help="[digits 64, cifar10 128]")
@click.option("--lr", type=float, default=None, help="Dense learning rate [digits 0.05, cifar10 0.1].")
@click.option("--finetune-lr", type=float, default=None, help="[0.01]")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True,
              help="Dense LR schedule (step: x0.1 at 40/60/80 % of the epochs).")
@click.option("--train-subset", type=int, default=None, help="Train on a fixed subset of N images (CPU runs).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Dense models and decoded images [$GROUPSPARSE_CACHE or ~/.cache/groupsparse].")
@click.option("--progress/--no-progress", default=None, help="Progress bars [on a terminal].")
def prune(**kw):
    """Train (or reuse) a dense model, prune it to --sparsity zeros by --method, finetune, report.

    Writes OUT/report.json (method, protocol, target_sparsity, zero_fraction, accuracy, val_accuracy,
    dense_accuracy, budget, per-layer figures, timings) and OUT/model.safetensors (pruned weights with real zeros).
    """
    from .runner import Config, run, summary

    kw["out"] = str(kw["out"])
    try:
        r = run(Config(**kw))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary(r))


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", "prefix", default=None,
              help="Write PREFIX.csv and PREFIX.png (table and accuracy-vs-zeros plot).")
@click.option("--baseline", default=None,
              help="Paired statistics against this method (METHOD or METHOD:PROTOCOL, e.g. gmp or gsp:during): "
                   "mean paired difference over shared seeds, standard error, wins/losses/ties.")
def report(dirs, prefix, baseline):
    """Aggregate run folders (searched for report.json) into an accuracy-vs-zero-fraction table.

    Runs are grouped by all their settings (not only method and sparsity), each folder counts once, and the
    budget (dense + after epochs) is shown. When stdout is not a terminal the table is plain text.
    """
    from .report import aggregate, find_reports, plot, print_table, write_csv

    try:
        rows = aggregate(find_reports(dirs), baseline=baseline)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if not rows:
        raise click.ClickException(f"got no report.json under {list(dirs)}, expected runs of `groupsparse prune`")
    if baseline and not any(r.get("baseline") for r in rows):
        raise click.ClickException(f"--baseline: got {baseline!r}, which matches no run with the same dataset, "
                                   "model, zeros and budget; expected a method present in the runs")
    print_table(rows, baseline)
    if prefix:
        write_csv(rows, f"{prefix}.csv")
        plot(rows, f"{prefix}.png")
        click.echo(f"wrote {prefix}.csv and {prefix}.png")


commands = [prune, report]
