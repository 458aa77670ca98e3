"""The command line's error style.

Every mistake a user can make (a bad argument, a missing or untrusted file, an unknown name, a model
that does not run) ends the command with ONE line ``error: <what is wrong and how to fix it>`` on stderr
and exit code 2. ``mirrorsym --debug COMMAND ...`` also prints the full traceback first. Commands raise
:class:`UserError` with a message that names the culprit (argument, file, module) and the fix; any other
exception that escapes a command is shown the same way, with its type and a hint to rerun with ``--debug``.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.16 ships its own copy of click
    _click_exceptions = importlib.import_module("typer._click.exceptions")
except ImportError:  # pragma: no cover - older typer uses click itself
    _click_exceptions = importlib.import_module("click.exceptions")

EXIT_USER_ERROR = 2

# typer's and click's control-flow exceptions (help, --version, typer.Exit) pass through untouched
_PASS_THROUGH = tuple(
    {typer.Exit, typer.Abort, _click_exceptions.ClickException,
     getattr(_click_exceptions, "Exit", typer.Exit), getattr(_click_exceptions, "Abort", typer.Abort)}
)

_state = {"debug": False}


class UserError(Exception):
    """A mistake in the command line or in what it points at; the message says what and how to fix it."""


def set_debug(flag: bool) -> None:
    """``--debug``: print full tracebacks before the one-line error."""
    _state["debug"] = bool(flag)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines, tabs) collapsed to one space."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """The one-line message for ``exc``: a UserError's own text; otherwise its type, its text and a hint."""
    if isinstance(exc, UserError):
        return one_line(exc)
    text = one_line(exc) or "(no message)"
    return f"{type(exc).__name__}: {text} (rerun as 'mirrorsym --debug ...' for the traceback)"


def print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def require_writable_dir(path: Path, option: str) -> Path:
    """Create ``path`` (and parents) if needed and check that a file can be written in it; a UserError
    naming ``option`` otherwise. Checked before any work starts so that results are never lost at the end."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} exists and is not a directory; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path} is not writable ({exc.strerror or exc}); choose a folder you can "
                        "write to") from exc
    return path


class ErrorStyleGroup(TyperGroup):
    """The ``mirrorsym`` command group: one-line errors and exit code 2 for everything that goes wrong.

    ``invoke`` turns exceptions raised inside a command (after ``--debug`` has been parsed) into the
    one-line error; ``main`` does the same for click's usage errors (unknown option, bad choice, missing
    argument), which typer would otherwise print as a boxed panel."""

    def invoke(self, ctx: Any) -> Any:  # ctx: a click Context (typer's own copy of click, or click)
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the one-line error
            if _state["debug"]:
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            print_error(describe(exc))
            raise typer.Exit(EXIT_USER_ERROR) from exc

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        set_debug(False)  # one process may run several commands (tests): never inherit --debug
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
            code = rv if isinstance(rv, int) else 0  # non-standalone click returns the exit code of Exit
        except _click_exceptions.NoArgsIsHelpError as exc:
            text = exc.format_message()
            if text.strip():  # with rich, typer has printed the help already
                typer.echo(text, err=True)
            code = exc.exit_code
        except _click_exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print_error(one_line(exc.format_message()) + hint)
            code = EXIT_USER_ERROR
        except (typer.Abort, getattr(_click_exceptions, "Abort", typer.Abort)):
            typer.echo("Aborted.", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code
