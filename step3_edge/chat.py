"""Step3 chat format (docs/model.md): messages -> prompt text with one `<im_patch>` per image.

The real Jinja `chat_template` of stepfun-ai/step3 is UNCONFIRMED. DEFAULT_CHAT_TEMPLATE renders
the shape of vLLM's Step3 example prompt in its no-space form (the form of vLLM's Step3-VL-10B
example and of another public test helper):

    <｜begin▁of▁sentence｜>{system}<|BOT|>user\\n{content}<|EOT|><|BOT|>assistant\\n{content}<|EOT|>
    ... and, with add_generation_prompt, <|BOT|>assistant\\n<think>\\n

The system text is optional and goes raw right after BOS (as in the vLLM example); a system
message is therefore only allowed as the first message. Content is a string or a list of parts
({"type": "text", "text": ...}, {"type": "image", "image": ...}, {"type": "image_url",
"image_url": {"url": ...}}); each image part renders as one `<im_patch>` placeholder that the
processor later expands. A checkpoint's own tokenizer_config.json `chat_template` wins over the
default (see `load_chat_template`).
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from step3_edge.errors import ConfigError, PromptError
from step3_edge.tokenizer import (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, THINK_END,
                                  read_tokenizer_config)

ROLES = ("system", "user", "assistant")
IMAGE_PART_TYPES = ("image", "image_url")

DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{ '<im_patch>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render_content(message['content']) }}"
    "{%- else -%}{{ '<|BOT|>' + message['role'] + '\\n' }}"
    "{{- render_content(message['content']) }}{{ '<|EOT|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|BOT|>assistant\\n<think>\\n' }}{%- endif -%}"
)

Message = dict[str, Any]


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a generated text: the prompt opens `<think>`, the model thinks,
    writes `</think>` (kept by `Step3Processor.decode`) and answers. Text without `</think>`
    is all answer (a model that does not think, or one stopped early)."""
    reasoning, sep, answer = text.rpartition(THINK_END)
    return (reasoning.strip(), answer) if sep else ("", text)



# ---------------------------------------------------------------------------- bounded rendering
MAX_TEMPLATE_CHARS = 1 << 20        # source of a chat template
MAX_RENDER_CHARS = 16 << 20         # a rendered prompt (and any string or list inside it)
RENDER_SECONDS = 5.0                # compile + render; the built-in template takes < 1 ms
_BIG_NUMBER = re.compile(r"\d{8,}")  # a width or precision of 10^7+ in a format string


class TemplateLimitError(TemplateError):
    """A chat template ran past the time or size it may take."""


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_values(values: Sequence[Any], what: str) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"{what} got the number {v}, over {MAX_RENDER_CHARS:,}")
        if _size(v) > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"{what} got a value of {_size(v):,} items")
        if isinstance(v, str) and ("%" in v or "{" in v) and _BIG_NUMBER.search(v):
            raise TemplateLimitError(f"{what} got a format string with a huge width")


def _str_method_growth(owner: str, name: str, args: tuple) -> int:
    """An upper bound of the length of `owner.<name>(*args)` for the methods that multiply."""
    lens = [len(str(a)) for a in args]
    if name == "replace":
        return len(owner) * (1 + max([0, *lens[1:2]])) + max([0, *lens[1:2]])
    if name == "join" and args and isinstance(args[0], (list, tuple, str)):
        items = list(args[0])
        return sum(len(str(i)) for i in items) + len(owner) * len(items)
    if name in ("format", "format_map"):
        return len(owner) + owner.count("{") * max([0, *lens, *(
            len(str(v)) for a in args if isinstance(a, dict) for v in a.values())])
    return len(owner)


class _BoundedNamespace(Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        _check_values([value], f"namespace.{name}")
        super().__setitem__(name, value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every operator, call and filter that can allocate checked first (a
    number or value past MAX_RENDER_CHARS is refused before it is used)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_values([left, right], f"operator {operator}")
        if operator == "*" and max(_size(left), _size(right)) * max(
                abs(x) for x in (left, right, 1) if isinstance(x, int)) > MAX_RENDER_CHARS:
            raise TemplateLimitError("a repetition longer than the render limit")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise TemplateLimitError(f"the power {right!r} is too large")
        if operator == "+" and _size(left) + _size(right) > MAX_RENDER_CHARS:
            raise TemplateLimitError("a concatenation longer than the render limit")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_values([*args, *kwargs.values()], f"call of {getattr(__obj, '__name__', '?')}")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            _check_values([owner], f"str.{name}")
            if _str_method_growth(owner, name, args + tuple(kwargs.values())) > \
                    MAX_RENDER_CHARS:
                raise TemplateLimitError(f"str.{name} would exceed {MAX_RENDER_CHARS:,} "
                                         "characters")
        out = super().call(__context, __obj, *args, **kwargs)
        _check_values([out], "a call's result")
        return out


def _filter_growth(name: str, args: tuple) -> int:
    """An upper bound of the length of what the filters that multiply their input return."""
    value, rest = (args[0], args[1:]) if args else (None, ())
    n = _size(value) if not isinstance(value, range) else len(value)
    if name == "join":
        sep = len(str(rest[0])) if rest else 0
        return sep * n + (sum(len(str(v)) for v in value) if isinstance(value, (list, tuple,
                                                                                range)) else n)
    if name == "indent" and isinstance(value, str):
        width = rest[0] if rest and isinstance(rest[0], (int, str)) else 4
        return len(value) + (value.count("\n") + 1) * (width if isinstance(width, int)
                                                        else len(width))
    if name == "replace" and isinstance(value, str) and len(rest) >= 2:
        return (len(value) + 1) * (1 + len(str(rest[1])))
    return 0


def _bounded_filter(name: str, f: Any) -> Any:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        plain = tuple(a for a in args if not hasattr(a, "environment"))  # drop env / context
        _check_values([a for a in (*plain, *kwargs.values()) if isinstance(a, (int, str, list))],
                      f"filter {name}")
        if _filter_growth(name, plain + tuple(kwargs.values())) > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"filter {name} would exceed {MAX_RENDER_CHARS:,} "
                                     "characters")
        out = f(*args, **kwargs)
        _check_values([out], f"filter {name}")
        return out
    return wrapper


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def bounded_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in (transformers' settings), with sizes bounded."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["namespace"] = _BoundedNamespace
    env.globals["range"] = safe_range
    env.filters = {k: _bounded_filter(k, v) for k, v in env.filters.items()}
    return env


def _tracer(deadline: float, seconds: float) -> Any:
    """A trace function that stops template code (frames of "<template>") past `deadline`."""
    def local(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"rendering took longer than {seconds:g} s")
        return local

    def glob(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == "<template>" else None
    return glob


def render_bounded(compiled: Template, **context: Any) -> str:
    """Render, stopping with TemplateLimitError past RENDER_SECONDS or MAX_RENDER_CHARS."""
    old = sys.gettrace()
    sys.settrace(_tracer(time.monotonic() + RENDER_SECONDS, RENDER_SECONDS))
    try:
        out, n = [], 0
        for piece in compiled.generate(**context):
            n += len(piece)
            if n > MAX_RENDER_CHARS:
                raise TemplateLimitError(f"the rendered prompt exceeds {MAX_RENDER_CHARS:,} "
                                         "characters")
            out.append(piece)
        return "".join(out)
    finally:
        sys.settrace(old)


_TEMPLATE_FIX = ("fix chat_template in tokenizer_config.json or remove it to use the "
                 "built-in Step3 template")


def compile_template(source: str) -> Template:
    """Compile a chat template in the bounded sandbox (transformers' settings); ConfigError
    for one that does not compile or is too long."""
    if not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS:
        raise ConfigError(f"chat template is {type(source).__name__} of {_size(source):,} "
                          f"characters, expected a string of at most {MAX_TEMPLATE_CHARS:,}",
                          _TEMPLATE_FIX)
    try:
        return bounded_environment().from_string(source)
    except TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e}", _TEMPLATE_FIX) from e
    except (TemplateLimitError, RecursionError, MemoryError) as e:
        raise ConfigError(f"chat template is refused: {e}", _TEMPLATE_FIX) from e


def _image_source(part: dict[str, Any], where: str) -> Any:
    if part["type"] == "image":
        src = part.get("image")
        if src is None:
            raise PromptError(f"{where} is an image part without an 'image' value",
                              "give {'type': 'image', 'image': <path, bytes, data URI or "
                              "PIL image>}")
        return src
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise PromptError(f"{where} is an image_url part without a url string",
                          "give {'type': 'image_url', 'image_url': {'url': 'data:image/png;"
                          "base64,...' or a file path}}")
    return url


def validate_messages(messages: Sequence[Message]) -> list[Any]:
    """Check roles and content; return the image sources in prompt order."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}",
                          "pass [{'role': 'user', 'content': 'Hello'}]")
    if not messages:
        raise PromptError("messages is empty", "pass at least one user message")
    images: list[Any] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise PromptError(f"{where} is a {type(msg).__name__}, expected a dict",
                              "each message is {'role': ..., 'content': ...}")
        role = msg.get("role")
        if role not in ROLES:
            raise PromptError(f"{where} has role {role!r}, expected one of {ROLES}",
                              "use 'system', 'user' or 'assistant'")
        if role == "system" and i != 0:
            raise PromptError(f"{where} is a system message but not the first message",
                              "put the (single) system message first")
        if "content" not in msg:
            raise PromptError(f"{where} has no 'content'", "add a 'content' string or list")
        content = msg["content"]
        if isinstance(content, str):
            _check_text(content, where)
            continue
        if not isinstance(content, list):
            raise PromptError(f"{where} content is a {type(content).__name__}, expected a "
                              "string or a list of parts", "pass a string, or a list of "
                              "{'type': 'text', ...} / {'type': 'image', ...} parts")
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise PromptError(f"{pwhere} is {part!r}, expected a dict with a 'type'",
                                  "use {'type': 'text', 'text': ...} or {'type': 'image', "
                                  "'image': ...}")
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptError(f"{pwhere} is a text part whose 'text' is "
                                      f"{part.get('text')!r}, not a string",
                                      "give {'type': 'text', 'text': '...'}")
                _check_text(part["text"], pwhere)
            elif kind in IMAGE_PART_TYPES:
                if role == "system":
                    raise PromptError(f"{pwhere} puts an image in the system message",
                                      "move the image into a user message")
                images.append(_image_source(part, pwhere))
            else:
                raise PromptError(f"{pwhere} has type {kind!r}, expected 'text', 'image' or "
                                  "'image_url'", "video and audio parts are not supported")
    return images


def _check_text(text: str, where: str) -> None:
    if IMAGE_TOKEN in text:
        raise PromptError(f"{where} text contains the image placeholder {IMAGE_TOKEN}",
                          "pass images as {'type': 'image', ...} parts, not as text")


def render_chat(messages: Sequence[Message], template: str | None = None,
                add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
    """Render `messages` with a Jinja chat template (DEFAULT_CHAT_TEMPLATE when None).

    Returns the prompt text, holding one `<im_patch>` per image, and the image sources in the
    order of their placeholders. Raises PromptError for malformed messages and ConfigError for a
    template that does not compile.
    """
    images = validate_messages(messages)
    compiled = compile_template(DEFAULT_CHAT_TEMPLATE if template is None else template)
    try:
        text = render_bounded(compiled, messages=list(messages),
                              add_generation_prompt=add_generation_prompt, bos_token=BOS_TOKEN,
                              eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    except (TemplateLimitError, RecursionError, MemoryError) as e:
        raise PromptError(f"chat template stopped: {type(e).__name__}: {e}",
                          "the chat template loops or grows without bound: "
                          + _TEMPLATE_FIX) from e
    except TemplateError as e:
        raise PromptError(f"chat template rejected the messages: {e}",
                          "check the roles and order of the messages") from e
    except (TypeError, ValueError, AttributeError, LookupError, ArithmeticError) as e:
        raise PromptError(f"chat template failed on the messages: {type(e).__name__}: {e}",
                          "check the messages, or " + _TEMPLATE_FIX) from e
    n = text.count(IMAGE_TOKEN)
    if n != len(images):
        raise PromptError(f"the chat template rendered {n} {IMAGE_TOKEN} placeholders for "
                          f"{len(images)} images",
                          "use a chat template that renders one <im_patch> per image part")
    return text, images


def load_chat_template(folder: str | Path, path: Path | None = None) -> str:
    """`chat_template` from tokenizer_config.json in `folder` (or the confined file `path`),
    else DEFAULT_CHAT_TEMPLATE."""
    template = read_tokenizer_config(folder, path).get("chat_template")
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(template, list):  # HF also allows [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ConfigError(f"chat_template in {Path(folder) / 'tokenizer_config.json'} is not a "
                          "string", "store the Jinja template as a string, or remove it")
    return template
