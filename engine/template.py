"""Chat templates: jinja2 code that comes with a downloaded model, rendered as untrusted code.

Rendering follows transformers' `apply_chat_template` (trim_blocks and lstrip_blocks, the
special tokens as variables, `raise_exception`, `tojson`, `strftime_now`), so the same messages
give the same string. Because the code is untrusted, it runs in jinja2's immutable sandbox (no
attribute access to Python internals, no mutation of the messages) with three bounds more:

- work: at most MAX_STEPS Python-level steps (counted by a trace function, for this thread
  only), so nested loops cannot run for hours;
- size: operators and filters that grow a string or list (`'x' * n`, `+`, `~`, `center`,
  `indent`, `replace`, `join`, `sum`, format widths, `**`) are checked before they allocate, and
  the output is cut off at MAX_CHARS, so nothing enormous is built or reaches the tokenizer
  (whose allocator aborts the process);
- errors: anything the template raises (1/0, an import, a recursion) is an EngineError.
"""
import json
import re
import sys
from datetime import datetime

import jinja2
from jinja2 import filters, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import EngineError

MAX_CHARS = 8_000_000       # a 128k-token conversation renders to about half a megabyte
MAX_STEPS = 5_000_000       # a long chat in DeepSeek's template takes some thousands
MAX_EXPONENT_BITS = 100_000
FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateLimit(Exception):
    """A template exceeded a bound (raised inside the render, reported as an EngineError)."""


def _check_size(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateLimit(f"{what} would make {size} items, more than the {MAX_CHARS} allowed")


def _check_format(fmt) -> None:
    """printf-style widths and precisions cannot exceed the output bound ('%2000000000d' % 1)."""
    if isinstance(fmt, str):
        for width, precision in FORMAT_WIDTH.findall(fmt):
            for number in (width, precision):
                if number == "*" or (number and int(number) > MAX_CHARS):
                    raise TemplateLimit(f"a format width of {number} is not allowed")


def _length(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


class BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join (jinja2 has no hook for it, unlike `+`)."""

    def visit_Concat(self, node, frame):
        self.write("environment.bounded_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = BoundedCodeGenerator

    @staticmethod
    def bounded_concat(values) -> str:
        strings = [str(value) for value in values]
        _check_size(sum(map(len, strings)), "a concatenation")
        return "".join(strings)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if _length(sequence) is not None and isinstance(count, int):
                    _check_size(_length(sequence) * count, "a repetition")
        elif operator == "+" and _length(left) is not None and _length(right) is not None:
            _check_size(_length(left) + _length(right), "a concatenation")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * abs(left).bit_length() > MAX_EXPONENT_BITS:
                raise TemplateLimit(f"{left} ** {right} is too large a number")
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)


def _center(value, width=80):
    _check_size(width if isinstance(width, int) else 0, "center")
    return filters.do_center(value, width)


def _indent(value, width=4, first=False, blank=False):
    if isinstance(width, int):
        _check_size(len(str(value)) * (1 + width), "indent")
    elif isinstance(width, str):
        _check_size(len(str(value)) * (1 + len(width)), "indent")
    return filters.do_indent(value, width, first, blank)


def _replace(eval_ctx, value, old, new, count=None):
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
        hits = value.count(old) if old else len(value) + 1
        _check_size(len(value) + hits * max(len(new) - len(old), 0), "replace")
    return filters.do_replace(eval_ctx, value, old, new, count)


_replace.jinja_pass_arg = filters.do_replace.jinja_pass_arg


@pass_eval_context
def _join(eval_ctx, value, d="", attribute=None):
    items = list(value)
    if attribute is not None:
        items = list(map(filters.make_attrgetter(eval_ctx.environment, attribute), items))
    _check_size(sum(len(x) if isinstance(x, str) else 16 for x in items) + len(str(d)) * len(items), "join")
    return filters.sync_do_join(eval_ctx, items, d)


@pass_environment
def _sum(environment, iterable, attribute=None, start=0):
    items = list(iterable)
    if attribute is not None:
        items = list(map(filters.make_attrgetter(environment, attribute), items))
    if _length(start) is not None or any(_length(x) is not None for x in items):
        _check_size((_length(start) or 0) + sum(_length(x) or 0 for x in items), "sum")
    return filters.sync_do_sum(environment, items, start=start)


def _format(value, *args, **kwargs):
    _check_format(value)
    return filters.do_format(value, *args, **kwargs)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise TemplateLimit("tojson's indent is limited to 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplate:
    """A compiled chat template; `render` gives the prompt text or raises an EngineError."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise EngineError(f"the chat template must be a string, not {type(source).__name__}")
        self.source = source
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters.update(tojson=_tojson, center=_center, indent=_indent, replace=_replace, format=_format,
                           join=_join, sum=_sum)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:100])
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise EngineError(f"the chat template is not valid jinja2: {e}") from None
        except (RecursionError, MemoryError):
            raise EngineError("the chat template is too deeply nested to compile") from None

    def render(self, **variables) -> str:
        steps = 0

        def count_steps(frame, event, arg):
            nonlocal steps
            steps += 1
            if steps > MAX_STEPS:
                raise TemplateLimit(f"it did more than {MAX_STEPS} steps of work")
            return count_steps

        pieces, size = [], 0
        previous = sys.gettrace()
        sys.settrace(count_steps)
        try:
            for piece in self.template.generate(**variables):
                size += len(piece)
                _check_size(size, "the rendered prompt")
                pieces.append(piece)
        except TemplateLimit as e:
            raise EngineError(f"the chat template was stopped: {e}") from None
        except (RecursionError, MemoryError) as e:
            raise EngineError(f"the chat template was stopped: {type(e).__name__}") from None
        except Exception as e:   # whatever the template's code raised
            detail = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise EngineError(f"the chat template failed on these messages: {detail}") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)
