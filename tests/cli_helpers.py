"""Shared by the CLI tests: run `groupsparse` in-process and check that a failure is exactly one line."""

from click.testing import CliRunner

from groupsparse.cli import main


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def one_error_line(result) -> str:
    """The failure is one line `groupsparse: error: ...`, a non-zero status and no traceback; returns the line."""
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("groupsparse: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]
