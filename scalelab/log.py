"""Logging setup for the command line: one logger, "scalelab"; library code logs and never prints.

A terminal gets rich's formatting; logs piped to a file stay one plain line per message.
"""

from __future__ import annotations

import logging
import sys


def setup(quiet: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = (RichHandler(show_time=False, show_path=False, markup=False, console=Console(stderr=True))
               if sys.stderr.isatty() else logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", handlers=[handler],
                        force=True)
