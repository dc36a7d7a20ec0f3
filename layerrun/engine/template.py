"""Rendering a model's chat template, which is untrusted code, within a budget.

Chat templates are Jinja programs that come with the model. They run in
Jinja's immutable sandbox (as in transformers, so prompts are byte-identical),
which blocks escapes but not exhaustion: nested ``range`` loops that run for
minutes, ``'a' * 10**10``, a string doubled in a loop, ``'x'|center(10**10)``.
So a render also has a budget:

- **time**: at most :data:`RENDER_CPU_SECONDS` of the rendering thread's CPU time
  (CPU time, not wall time, so a busy machine does not fail a good template),
  checked from a trace function on every line of Python that runs during the
  render (the template's compiled code and anything it calls);
- **size**: every operation that can build a large value from a small one
  (``*``, ``**``, ``+``, ``%``, ``~``, ``str.format``, ``center``/``ljust``/…,
  ``replace``, ``join``, the ``indent``/``batch``/``slice``/``tojson`` filters)
  is checked *before* it runs against a limit of :data:`RENDER_MAX_CHARS` (plus
  four times the size of the messages), as is the output; and the bytes all such
  operations produce together are bounded too.

A template that exceeds its budget, fails to compile, trips the sandbox or raises
fails with one :class:`TemplateFailed` line naming the template's file.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from datetime import datetime

from layerrun.errors import FormatError, LayerRunError

RENDER_CPU_SECONDS = 1.0
RENDER_MAX_CHARS = 8 * 2**20
PRODUCED_FACTOR = 32  # all checked operations together may build this many times the size limit
MAX_INT_BITS = 100_000
_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format spec


class TemplateFailed(LayerRunError):
    """The chat template could not turn these messages into a prompt (the message says why and where)."""


class TemplateBudgetExceeded(Exception):
    """Raised inside a render that went over its budget (turned into a TemplateFailed)."""


class Budget:
    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.produced_left = PRODUCED_FACTOR * max_chars
        self.deadline = time.thread_time() + RENDER_CPU_SECONDS
        self.lines = 0

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise TemplateBudgetExceeded(f"{what} would build {n:,} characters (the limit is {self.max_chars:,})")
        self.produced_left -= n
        if self.produced_left < 0:
            raise TemplateBudgetExceeded(
                f"it built more than {PRODUCED_FACTOR * self.max_chars:,} characters in all")

    def tracer(self, frame, event, arg):
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if not self.lines & 127 and time.thread_time() > self.deadline:
                raise TemplateBudgetExceeded(f"it ran for more than {RENDER_CPU_SECONDS:g} s of CPU time")
        return self._line


_current = threading.local()


def _budget() -> Budget | None:
    return getattr(_current, "budget", None)


def _check(n: int, what: str) -> None:
    b = _budget()
    if b is not None:
        b.size(n, what)


def _sized(v) -> int | None:
    return len(v) if isinstance(v, (str, list, tuple)) else None


def _check_format_widths(fmt: str, what: str) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise TemplateBudgetExceeded(f"{what} asks for a field width of a million characters or more")


def _check_binop(op: str, a, b) -> None:
    if op == "*":
        for x, n in ((a, b), (b, a)):
            if _sized(x) is not None and isinstance(n, int):
                _check(len(x) * max(n, 0), "a repetition (*)")
        if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise TemplateBudgetExceeded("a multiplication would build an integer of over 100,000 bits")
    elif op == "**":
        if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0:
            if b * math.log2(abs(a)) > MAX_INT_BITS:
                raise TemplateBudgetExceeded("a power (**) would build an integer of over 100,000 bits")
    elif op == "+":
        if _sized(a) is not None and _sized(b) is not None:
            _check(len(a) + len(b), "a concatenation (+)")
    elif op == "%" and isinstance(a, str):
        _check_format_widths(a, "a %-format")


def _joined(sep: str, items, what: str) -> tuple[list, int]:
    parts = list(items)
    n = len(sep) * max(len(parts) - 1, 0) + sum(len(p) if isinstance(p, str) else 16 for p in parts)
    _check(n, what)
    return parts, n


def _checked_str_method(s: str, name: str, method):
    def call(*args, **kwargs):
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            _check(max(args[0], len(s)), f"str.{name}")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(size, int):
                _check(len(s) + s.count("\t") * max(size, 0), "str.expandtabs")
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            hits = s.count(old) if old else len(s) + 1
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                hits = min(hits, args[2])
            _check(len(s) + hits * max(len(new) - len(old), 0), "str.replace")
        elif name == "join" and args:
            parts, _ = _joined(s, args[0], "str.join")
            return method(parts)
        return method(*args, **kwargs)

    return call


_SIZED_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join"}


def make_environment():
    """The sandbox transformers renders chat templates with, plus the budget's checks."""
    from jinja2 import filters
    from jinja2.runtime import markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                _check_format_widths(value.__self__, "str.format")
            return wrapped

        def _guard(self, obj, name, value):
            if isinstance(obj, str) and name in _SIZED_METHODS and callable(value):
                return _checked_str_method(obj, name, value)
            return value

        def getattr(self, obj, attribute):
            return self._guard(obj, attribute, super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            return self._guard(obj, argument, super().getitem(obj, argument))

        @staticmethod
        def concat(parts):
            parts, _ = _joined("", parts, "a {% set %} block or macro")
            return "".join(parts)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.pop("lipsum", None)  # a generator of any number of paragraphs; no chat template uses it

    def raise_exception(msg):
        from jinja2.exceptions import TemplateError

        raise TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
            raise TemplateBudgetExceeded("tojson's indent is larger than 64")
        out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        _check(len(out), "tojson")
        return out

    def strftime_now(fmt):
        if not isinstance(fmt, str) or len(fmt) > 256:
            raise TemplateBudgetExceeded("strftime_now's format is longer than 256 characters")
        return datetime.now().strftime(fmt)

    def sized_filter(name, fn, arg_check):
        def f(*args, **kwargs):
            arg_check(*args, **kwargs)
            return fn(*args, **kwargs)

        f.__name__ = name
        for attr in ("jinja_pass_arg",):  # keep pass_context / pass_environment markers
            if hasattr(fn, attr):
                setattr(f, attr, getattr(fn, attr))
        return f

    def check_center(value, width=80):
        if isinstance(width, int):
            _check(max(width, len(str(value))), "the center filter")

    def check_indent(s, width=4, *a, **k):
        lines = str(s).count("\n") + 1
        w = width if isinstance(width, int) else len(str(width))
        _check(len(str(s)) + lines * max(w, 0), "the indent filter")

    def check_batch(value, linecount, fill_with=None):
        if isinstance(linecount, int):
            _check(linecount, "the batch filter")

    def check_slice(value, slices, fill_with=None):
        if isinstance(slices, int):
            _check(slices, "the slice filter")

    def check_format(value, *args, **kwargs):
        _check_format_widths(value, "the format filter")

    def check_replace(*args, **kwargs):  # (eval_ctx, s, old, new, count=None)
        s, old, new = (list(args[1:4]) + [None, None, None])[:3]
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            _checked_str_method(s, "replace", lambda *a: None)(old, new)

    def join_filter(eval_ctx, value, d="", attribute=None):
        parts, _ = _joined(str(d), value, "the join filter")
        return filters.do_join(eval_ctx, parts, d, attribute)

    join_filter.jinja_pass_arg = filters.do_join.jinja_pass_arg
    env.filters.update(
        center=sized_filter("center", filters.do_center, check_center),
        indent=sized_filter("indent", filters.do_indent, check_indent),
        batch=sized_filter("batch", filters.do_batch, check_batch),
        slice=sized_filter("slice", filters.do_slice, check_slice),
        format=sized_filter("format", filters.do_format, check_format),
        replace=sized_filter("replace", filters.do_replace, check_replace),
        join=join_filter,
        tojson=tojson,
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now

    def checked_join(join):
        def run(seq):
            parts = [str(x) for x in seq]
            _check(sum(map(len, parts)), "a concatenation (~)")
            return join(parts)

        return run

    env.checked_joins = {"str_join": checked_join(str_join), "markup_join": checked_join(markup_join)}
    return env


def compile_template(env, source: str, where):
    """A compiled template whose ``~`` concatenations are checked too; errors name ``where``."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        t = env.from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateFailed(f"{where}: the chat template has a syntax error (line {e.lineno}: {e.message})") from None
    except (TemplateError, RecursionError, MemoryError) as e:
        raise TemplateFailed(f"{where}: the chat template cannot be compiled ({type(e).__name__}: {e})") from None
    t.root_render_func.__globals__.update(env.checked_joins)  # `~` compiles to these module-level helpers
    return t


def render(template, where, input_chars: int, **context) -> str:
    """Render within the budget; any failure is one TemplateFailed naming ``where``."""
    from jinja2.exceptions import SecurityError, TemplateError, UndefinedError

    budget = Budget(RENDER_MAX_CHARS + 4 * input_chars)
    previous_budget, previous_trace = _budget(), sys.gettrace()
    _current.budget = budget
    out: list[str] = []
    total = 0
    sys.settrace(budget.tracer)
    try:
        for piece in template.generate(**context):
            total += len(piece)
            if total > budget.max_chars:
                raise TemplateBudgetExceeded(f"its output passed {budget.max_chars:,} characters")
            out.append(piece)
    except TemplateBudgetExceeded as e:
        raise TemplateFailed(f"{where}: the chat template went over its budget: {e}; the template is broken or hostile") from None
    except SecurityError as e:
        raise TemplateFailed(f"{where}: the chat template tried something the sandbox forbids ({e})") from None
    except RecursionError:
        raise TemplateFailed(f"{where}: the chat template recursed too deeply") from None
    except UndefinedError as e:
        raise TemplateFailed(f"{where}: the chat template failed: {e}") from None
    except TemplateError as e:  # raise_exception(...) in the template: it refuses these messages
        raise TemplateFailed(f"{where}: the chat template refused the messages: {e}") from None
    except MemoryError:
        raise TemplateFailed(f"{where}: the chat template ran out of memory") from None
    except (FormatError, LayerRunError):
        raise
    except Exception as e:  # the template is untrusted code: whatever it raises is its failure, not ours
        raise TemplateFailed(f"{where}: the chat template failed ({type(e).__name__}: {e})") from None
    finally:
        sys.settrace(previous_trace)
        _current.budget = previous_budget
    return "".join(out)
