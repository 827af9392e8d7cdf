"""What both command lines (`flexgen`, `flexgen-helm`) share: the version, help that shows defaults,
and exit codes: 2 for a usage mistake (argparse's own, and `UsageError`), 1 for a failure while
running, 130 for Ctrl-C; each error one line, `error: ...`, never a traceback."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Callable


class UsageError(ValueError):
    """A mistake in the command line itself (a flag's value or a combination of flags): exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (where it has one that is not None or False)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == [] or \
                not action.option_strings or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    try:
        return metadata.version("flexgen-helm")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def run_command(run: Callable[[], int | None]) -> int:
    """Run a parsed command; map its errors to one line and an exit code."""
    try:
        return run() or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        message = str(e) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
