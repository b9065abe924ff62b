"""The one error wrapper: every command registered on a :class:`Typer` turns any exception into
one line naming the file or option and the reason, with exit status 2 (``vitcircuits --debug …``
shows the traceback instead)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
DEBUG = {"traceback": False}
"""Set by ``--debug``: let exceptions through with their traceback."""
EXPECTED = (ValueError, OSError, RuntimeError, KeyError)
"""Exceptions whose message is written for the user; others are prefixed with their type."""


def one_line(err: BaseException) -> str:
    """``err`` as one printable line: whitespace collapsed, other control characters escaped."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    if not isinstance(err, EXPECTED):
        text = f"{type(err).__name__}: {text} (--debug shows the traceback)"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: an exception becomes one red line on stderr and exit status 2."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:
            if DEBUG["traceback"]:
                raise
            console.print(f"[bold red]error:[/] {escape(one_line(err))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
    return run


class Typer(typer.Typer):
    """A Typer whose commands all go through :func:`one_line_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)
        return lambda command: register(one_line_errors(command))
