"""``groupsparse prune-checkpoint``: single-shot GSP of a checkpoint file, without the model's code."""

from __future__ import annotations

import time

import click

TENSOR_RULE_HELP = ("Without --any-tensor, a tensor is pruned when it is floating, 2-D (linear) or 3-5-D (conv), "
                    "its name ends in 'weight' and does not look like a norm or embedding (norm, bn, ln, embed, wte, wpe).")


@click.command("prune-checkpoint")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.option("--sparsity", "-s", type=float, required=True, help="Target average Hoyer sparsity in [0, 1].")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Output .safetensors/.pt (never the input; written atomically).")
@click.option("--vectors", type=click.Choice(["filter", "fan_out", "kernel_position", "kernel", "layer"]),
              default="filter", show_default=True, help="How a tensor is cut into vectors.")
@click.option("--scope", type=click.Choice(["layer", "model"]), default="layer", show_default=True,
              help="layer: each tensor its own group at the target; model: one group over all tensors.")
@click.option("--normalize", type=click.Choice(["none", "vector", "layer"]), default="none", show_default=True,
              help="Rescale vectors before the projection (for --scope model).")
@click.option("--include", multiple=True, help="Glob (or re:REGEX) on tensor names; only matches are pruned. Repeatable.")
@click.option("--exclude", multiple=True, help="Glob (or re:REGEX) on tensor names never pruned. Repeatable.")
@click.option("--any-tensor", is_flag=True, help="Drop the name/shape rule (" + TENSOR_RULE_HELP + "): every floating "
              "tensor matching --include (or every floating tensor) is pruned.")
@click.option("--key", default=None, help="Key of the state_dict inside a .pt checkpoint (default: auto).")
@click.option("--engine", type=click.Choice(["auto", "numba", "torch"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def prune_checkpoint(inp, sparsity, out, vectors, scope, normalize, include, exclude, any_tensor, key, engine, json_path):
    """Project the layer weights of checkpoint IN to an average Hoyer sparsity and write all tensors to OUT.

    \b
    Which tensors: see --any-tensor. Tensors whose vectors would have one entry (e.g. 1x1 convs with
    --vectors kernel) are left as they are. Everything else in IN is copied unchanged.
    """
    from ..io import check_distinct
    from .checkpoint import load_state_dict, prune_state_dict, save_state_dict
    from .report import sparsity_report

    try:
        check_distinct(inp, out)
        sd = load_state_dict(inp, key=key)
        t0 = time.perf_counter()
        new, names, infos = prune_state_dict(sd, sparsity, vectors=vectors, scope=scope,
                                             normalize=None if normalize == "none" else normalize,
                                             include=list(include) or None, exclude=list(exclude) or None,
                                             rule=(lambda n, t: True) if any_tensor else None, engine=engine)
        elapsed = time.perf_counter() - t0
        save_state_dict(new, out, input_path=inp)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    report = sparsity_report(new, vectors=vectors, names=names)
    report.print(title=f"{inp} -> {out}")
    if json_path:
        import json

        from ..io import atomic_path

        doc = report.to_dict()
        doc.update(target=sparsity, scope=scope, seconds=elapsed, input=str(inp), output=str(out))
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    click.echo(f"{len(names)} tensors projected to average Hoyer sparsity {sparsity} ({vectors}, scope {scope}) in "
               f"{elapsed:.2f} s -> {out}")


commands = [prune_checkpoint]
