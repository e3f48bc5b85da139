"""What every command shares, below all of them (cli.py, diff/cli.py, ref/commands.py,
ref/demo.py import it; it imports none of them): the error policy, progress bars, option
types, JSON for stdout, timestamps.

The error policy: bad input is one ``error: ...`` line on stderr and exit code 2; an
interrupt is exit 130; anything no handler expected is still one line,
``error: internal error in CMD at FILE:LINE (please report): ...``, and exit code 3 (the
test suite fails if a test input reaches it); so is a Rust library's panic that no guard
caught (pyo3's ``PanicException`` is a BaseException). Warnings print as ``warning: ...``
lines. An error or warning is one line whatever it quotes: what is not printable in it is
written as its escape (`one_line`).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from .errors import AprError

EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 3, 130


def one_line(message: str) -> str:
    """``message`` with every character that is not printable written as its escape (``\\n``,
    ``\\r``, ``\\u2028``, ``\\x1b``, a lone surrogate's ``\\udcff``): an error or warning
    that quotes a name read from a file stays one line, and sends no control sequence to the
    terminal. Messages quote such names with repr (`apr.untrusted.describe`); this is the
    backstop for one that does not."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in message)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def _foreign_panic(e: BaseException) -> bool:
    """A Rust library's panic (pyo3's ``PanicException``, a BaseException)."""
    return type(e).__name__ == "PanicException" or type(e).__module__ == "pyo3_runtime"


def _internal_error(e: BaseException) -> None:
    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else "apr-ref"
    message = " ".join(str(e).split())[:300]
    frames = traceback.extract_tb(e.__traceback__)
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    fail(f"internal error in {name}{at} (please report): {type(e).__name__}: {message}", EXIT_INTERNAL)


def handle_errors(fn: Callable) -> Callable:
    """The error policy (see the module notes) around a command's body."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AprError as e:
            fail(str(e))
        except BrokenPipeError:              # `apr-ref ... | head`
            sys.stderr.close()
            sys.exit(0)
        except MemoryError as e:
            fail(f"out of memory{': ' + str(e) if str(e) else ''}")
        except OSError as e:
            where = getattr(e, "filename", None)
            fail(f"{where}: {e.strerror}" if where and getattr(e, "strerror", None) else str(e))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:       # noqa: BLE001 - the point of a last resort
            _internal_error(e)
        except BaseException as e:   # noqa: BLE001 - a panic that no guard caught
            if not _foreign_panic(e):
                raise
            _internal_error(e)
    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {one_line(str(message))}", err=True)


def show_warnings_as_lines() -> None:
    """Python warnings (AprWarning and others) print as one ``warning: ...`` line each."""
    warnings.showwarning = _show_warning


def json_text(doc: Any, **kw) -> str:
    """JSON for stdout: UTF-8 where it can be, \\u escapes where a string is not valid Unicode."""
    text = json.dumps(doc, indent=2, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc, indent=2, ensure_ascii=True, **kw)
    return text


# --------------------------------------------------------------------------- progress

def show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, not into a pipe or file."""
    return not quiet and sys.stderr.isatty()


class _NoBar:
    """The bar of a run nobody watches: the calls a tqdm bar takes here, doing nothing (and
    not importing tqdm, 50 ms of a `diff`)."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(enabled: bool, **kw: Any):
    """A tqdm bar on stderr (``update``, ``set_postfix``, ``close``, a context manager), or,
    when not enabled, one that does nothing. Keyword arguments go to tqdm (total, unit, desc,
    initial, ...)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    tqdm.monitor_interval = 0       # no monitor thread left behind (diff forks only when alone)
    kw.setdefault("leave", False)
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def log_lines(quiet: bool) -> Callable[[str], None]:
    """A log function for stderr; with --quiet only ``warning:`` lines pass."""
    def log(message: str) -> None:
        if not quiet or message.startswith("warning:"):
            click.echo(message, err=True)
    return log


# --------------------------------------------------------------------------- values

def utc_timestamp() -> str:
    """Now, as written into files: 2026-12-02T21:44:23Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_token_ids(text: str, option: str = "--tokens") -> list[int]:
    """Comma-separated token ids ("1, 2,3"); anything else is an AprError naming the option."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise AprError(f"{option} {text!r}: expected comma-separated integers") from None


def with_ignore_key(cmd: click.Command) -> click.Command:
    """Give a command the --ignore-key option: config keys the reader would refuse as unknown
    (or as not at their default) are skipped for this run."""
    from .config import ignoring_keys
    cmd.params.append(click.Option(
        ["--ignore-key", "ignore_keys"], multiple=True, metavar="KEY",
        help="Read a config/metadata key that would be refused as unknown or non-default as if "
             "it were absent (repeatable). Only for keys you know do not change the logits."))
    inner = cmd.callback

    @functools.wraps(inner)
    def callback(*args, ignore_keys=(), **kwargs):
        with ignoring_keys(ignore_keys):
            return inner(*args, **kwargs)
    cmd.callback = callback
    return cmd
