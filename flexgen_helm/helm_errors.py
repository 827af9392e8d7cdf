"""Our errors in `helm-run`'s terminal as one line each, not inside HELM's tracebacks.

HELM logs every failed run entry with the traceback of its exception ("Error when running X:" and
the stack), glues `Request: Request(...)` to the end of a client's error, and ends `helm-run` with an
uncaught `RunnerError` (or, with `--exit-on-error`, the `ExecutorError` itself), whose traceback
Python prints. For a failure whose message is this plugin's own (it starts "FlexGen"), the traceback
says nothing a user can act on: the message names the problem. So, installed when helm-run imports the
plugin:
- a filter on HELM's logger rewrites that log record to "Error when running X: <our message>";
- an exception hook prints HELM's final `RunnerError`, and an `ExecutorError` of ours, as one line
  (`helm-run: ...`) and exits with status 1, as the traceback did. Other exceptions keep Python's
  traceback, and other log records are untouched.
"""

from __future__ import annotations

import logging
import re
import sys

OURS = re.compile(r"(?:FlexGen|FlexGenClient)\b[^\n]*")
_REQUEST_TAIL = re.compile(r" Request: Request\(.*\)\s*$", re.DOTALL)


def our_message(text: str) -> str | None:
    """Our one-line message inside an exception's text or traceback, without HELM's `Request:` tail."""
    last = text.rstrip().splitlines()[-1] if text.strip() else ""
    last = _REQUEST_TAIL.sub("", last)
    found = OURS.search(last)
    return found.group(0).strip() if found else None


class _OneLineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "Error when running" in record.msg and "Traceback" in record.msg:
            head, _, trace = record.msg.partition("\n")
            message = our_message(_REQUEST_TAIL.sub("", trace))
            if message:
                record.msg, record.args = f"{head} {message}", ()
        return True


def _excepthook(kind, error, trace, previous=sys.excepthook):
    name = f"{kind.__module__}.{kind.__name__}"
    message = our_message(str(error)) if name == "helm.benchmark.executor.ExecutorError" else None
    if name == "helm.benchmark.runner.RunnerError":
        message = str(error)
    if message is None:
        previous(kind, error, trace)
        return
    print(f"helm-run: {message}", file=sys.stderr)


def install() -> None:
    logger = logging.getLogger("helm")
    if not any(isinstance(f, _OneLineFilter) for f in logger.filters):
        logger.addFilter(_OneLineFilter())
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
