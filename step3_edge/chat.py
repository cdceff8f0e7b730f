"""Step3 chat format (spec §5.4): messages -> prompt text with one `<im_patch>` per image.

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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    # the settings transformers uses for chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


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
    source = DEFAULT_CHAT_TEMPLATE if template is None else template
    env = _environment()
    try:
        compiled = env.from_string(source)
    except TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e}",
                          "fix chat_template in tokenizer_config.json or remove it to use the "
                          "built-in Step3 template") from e
    try:
        text = compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    except TemplateError as e:
        raise PromptError(f"chat template rejected the messages: {e}",
                          "check the roles and order of the messages") from e
    n = text.count(IMAGE_TOKEN)
    if n != len(images):
        raise PromptError(f"the chat template rendered {n} {IMAGE_TOKEN} placeholders for "
                          f"{len(images)} images",
                          "use a chat template that renders one <im_patch> per image part")
    return text, images


def load_chat_template(folder: str | Path) -> str:
    """`chat_template` from tokenizer_config.json in `folder`, else DEFAULT_CHAT_TEMPLATE."""
    template = read_tokenizer_config(folder).get("chat_template")
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(template, list):  # HF also allows [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ConfigError(f"chat_template in {Path(folder) / 'tokenizer_config.json'} is not a "
                          "string", "store the Jinja template as a string, or remove it")
    return template
