"""Text that an uploader or a bundle chose, shown literally: one helper per medium.

True labels (folder names, ``x-goog-meta-true_label``), object names, a bundle's name and
labels reach a terminal (rich), plots (matplotlib) and ``report.md`` (Markdown). Each medium
has a syntax of its own — rich markup (``[red]``, ``[link=…]``) and ``:emoji:``, matplotlib's
mathtext (``$\\frac{a}{b}$``), Markdown's ``|``, backticks, ``*`` and inline HTML — so such
text either aborts the render (``[/x]`` is a ``MarkupError``, ``$\\foo$`` a ``ValueError``) or
changes what a reader sees. Every helper first applies :func:`pipeline.names.printable`:
control characters (terminal escape sequences, newlines, bidi overrides) are shown as
``\\x1b``, ``\\n``, ``\\u202e``, and long text is cut.

    console.print(terminal(label))            # rich: a Text is never parsed for markup
    with literal_plots(): ax.set_title(plot_label(label))   # matplotlib: no mathtext, no TeX
    f"| {markdown(label)} |"                  # Markdown: punctuation backslash-escaped
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from pipeline.names import printable

if TYPE_CHECKING:
    from rich.text import Text

PLOT_CHARS = 40  # a tick label or legend entry longer than this is cut (the tables have it all)
TEXT_CHARS = 300  # terminal and Markdown cells

P = ParamSpec("P")
R = TypeVar("R")


def terminal(text: object, limit: int = TEXT_CHARS) -> Text:
    """For rich: a ``Text`` is rendered as is — no markup, no ``:emoji:`` codes, no
    highlighting — unlike a ``str`` handed to ``Console.print`` or ``Table.add_row``."""
    from rich.text import Text

    return Text(printable(str(text), limit))


def plot_label(text: object, limit: int = PLOT_CHARS) -> str:
    """For matplotlib, drawn under :func:`literal_plots` (which turns mathtext off)."""
    return printable(str(text), limit)


@contextmanager
def literal_plots() -> Iterator[None]:
    """Every ``Text`` made inside is drawn as typed: ``$…$`` is not mathtext and TeX is off.

    Scoped with ``rc_context`` (not set globally) so the process's other plots keep their
    settings; ticks and legends made lazily at ``savefig`` must be made inside it too.
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield


def literal_figure(draw: Callable[P, R]) -> Callable[P, R]:
    """A plot writer whose whole body, ``savefig`` included, runs under :func:`literal_plots`."""

    @wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with literal_plots():
            return draw(*args, **kwargs)

    return wrapper


# CommonMark lets a backslash escape any ASCII punctuation. Escaped here: what starts code
# (`), emphasis (* and a "_" that is not inside a word — "no_imagenet_class" stays as is),
# links and images ([ ] !), inline HTML and autolinks (< >), entities (&), table cells (|),
# GFM strikethrough (~), GitHub math ($) and emoji shortcodes (:), and the backslash itself.
_MARKDOWN = re.compile(r"[\\`*\[\]!<>&|~$:]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def markdown(text: object, limit: int = TEXT_CHARS) -> str:
    """For one line of Markdown (a table cell, a caption): shown as typed when rendered."""
    return _MARKDOWN.sub(lambda m: "\\" + m.group(), printable(str(text), limit))
