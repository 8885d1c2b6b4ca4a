"""Consoles for the CLI's tables: full width in logs and CI, where there is no terminal to measure."""

from __future__ import annotations

from rich.console import Console


def wide_console(stderr: bool = False) -> Console:
    """A rich Console that does not squeeze tables into 80 columns when output is not a terminal."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)
