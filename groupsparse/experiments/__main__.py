"""``python -m groupsparse.experiments prune|report ...``: the same commands as ``groupsparse prune|report``."""

import click

from .cli import commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Pruning experiments (same as `groupsparse prune` / `groupsparse report`)."""


for _c in commands:
    main.add_command(_c)

if __name__ == "__main__":
    main()
