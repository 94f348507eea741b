"""``groupsparse prune`` and ``groupsparse report`` (registered by groupsparse.cli through ``commands``)."""

from __future__ import annotations

import json

import click

from .datasets import DATASETS
from .models import MODELS
from .runner import METHODS


@click.command("prune")
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@click.option("--model", type=click.Choice(MODELS), default="mlp", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="gsp", show_default=True,
              help="gsp: induced GSP then magnitude finalization; gsp-single-shot: one projection of the dense "
                   "model; magnitude: global magnitude; deephoyer: Hoyer-Square regularizer then threshold; "
                   "random: per-layer random masks (a floor).")
@click.option("--sparsity", "-s", type=float, default=0.95, show_default=True,
              help="Target ZERO FRACTION of the final model over all Conv/Linear weights, for every method "
                   "(not a Hoyer sparsity; see --gsp-sparsity).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
              help="Run directory: report.json, model.safetensors, checkpoints (a rerun resumes).")
@click.option("--data", type=click.Path(), default=None,
              help="cifar10 only: cifar-10-batches-py dir or tarball, image-folder tree or zip, or decoded .npz.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
@click.option("--epochs", type=int, default=None, help="Dense training epochs [digits 30, cifar10 30].")
@click.option("--finetune-epochs", type=int, default=None,
              help="Epochs after the dense model, the same for every method [digits 20, cifar10 15].")
@click.option("--induce-epochs", type=int, default=None,
              help="gsp/deephoyer: the part of --finetune-epochs spent projecting/regularizing [half].")
@click.option("--gsp-sparsity", type=float, default=None,
              help="Hoyer target of the GSP projection [from --sparsity by REFERENCE.md §3's table, e.g. "
                   "0.80->0.675, 0.90->0.778, 0.95->0.86, 0.98->0.925].")
@click.option("--gsp-every", type=int, default=None, help="gsp: project every k iterations [a third of an epoch].")
@click.option("--hoyer-lambda", type=float, default=None, help="deephoyer: regularizer weight [digits 2e-4, cifar10 1e-5].")
@click.option("--batch-size", type=int, default=None, help="[digits 64, cifar10 128]")
@click.option("--lr", type=float, default=None, help="Dense learning rate [digits 0.05, cifar10 0.1].")
@click.option("--finetune-lr", type=float, default=None, help="[0.01]")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True,
              help="Dense LR schedule (step: x0.1 at 40/60/80 % of the epochs).")
@click.option("--train-subset", type=int, default=None, help="Train on a fixed subset of N images (CPU runs).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Dense models and decoded images [$GROUPSPARSE_CACHE or ~/.cache/groupsparse].")
@click.option("--progress/--no-progress", default=None, help="Progress bars [on a terminal].")
def prune(dataset, model, method, sparsity, seed, out, data, device, epochs, finetune_epochs, induce_epochs,
          gsp_sparsity, gsp_every, hoyer_lambda, batch_size, lr, finetune_lr, schedule, train_subset, cache_dir,
          progress):
    """Train (or reuse) a dense model, prune it to --sparsity zeros by --method, finetune, report.

    Writes OUT/report.json (method, target_sparsity, zero_fraction, accuracy, dense_accuracy, per-layer figures,
    timings) and OUT/model.safetensors (pruned weights with real zeros).
    """
    from .runner import Config, run

    cfg = Config(dataset=dataset, model=model, method=method, sparsity=sparsity, seed=seed, out=out, data=data,
                 device=device, epochs=epochs, finetune_epochs=finetune_epochs, induce_epochs=induce_epochs,
                 batch_size=batch_size, lr=lr, finetune_lr=finetune_lr, schedule=schedule, gsp_sparsity=gsp_sparsity,
                 gsp_every=gsp_every, hoyer_lambda=hoyer_lambda, train_subset=train_subset, cache_dir=cache_dir,
                 progress=progress)
    try:
        r = run(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({k: r[k] for k in ("method", "target_sparsity", "zero_fraction", "accuracy",
                                             "dense_accuracy", "accuracy_before_finetune")}))


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", "prefix", default=None,
              help="Write PREFIX.csv and PREFIX.png (table and accuracy-vs-zeros plot).")
def report(dirs, prefix):
    """Aggregate run directories (searched for report.json) into an accuracy-vs-zero-fraction table."""
    from .report import aggregate, find_reports, plot, print_table, write_csv

    try:
        rows = aggregate(find_reports(dirs))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if not rows:
        raise click.ClickException(f"got no report.json under {list(dirs)}, expected runs of `groupsparse prune`")
    print_table(rows)
    if prefix:
        write_csv(rows, f"{prefix}.csv")
        plot(rows, f"{prefix}.png")
        click.echo(f"wrote {prefix}.csv and {prefix}.png")


commands = [prune, report]
