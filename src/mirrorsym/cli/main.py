"""The ``mirrorsym`` typer app: global options (``--version``, ``--debug``) and the commands.

Thin by design: each command parses its arguments, loads through :mod:`.loading`, calls the library and
shows the result; errors follow :mod:`.errors` (one line ``error: ...``, exit code 2).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .diagnose import diagnose
from .errors import ErrorStyleGroup, set_debug
from .reproduce import reproduce
from .scan import scan

app = typer.Typer(
    cls=ErrorStyleGroup,
    help="mirrorsym: find, diagnose, predict and control the parameter symmetries of PyTorch models. "
    "Model inputs: --input-shape is the full shape including the batch dimension (e.g. 1,3,224,224).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version (importlib.metadata); ``mirrorsym.__version__`` when running
    from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirrorsym")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mirrorsym {package_version()}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the mirrorsym version and exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks (otherwise an error is one line).")] = False,
) -> None:
    """mirrorsym: find, diagnose, predict and control the parameter symmetries of PyTorch models."""
    set_debug(debug)


app.command("scan")(scan)
app.command("diagnose")(diagnose)
app.command("reproduce")(reproduce)


def main() -> None:  # pragma: no cover
    app()
