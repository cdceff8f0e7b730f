"""Chat format: literal rendering, validation, template loading."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from step3_edge.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template, render_chat
from step3_edge.errors import ConfigError, PromptError
from step3_edge.tokenizer import write_tokenizer_files

BOS = "<｜begin▁of▁sentence｜>"


def _png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_multi_turn_with_system_and_images_renders_literally() -> None:
    img = Image.new("RGB", (8, 8))
    uri = _png_data_uri()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": img},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A black square."},
        {"role": "user", "content": [{"type": "text", "text": "And this one: "},
                                     {"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": "?"}]},
    ]
    text, images = render_chat(messages)
    assert text == (
        f"{BOS}You are a helpful assistant."
        "<|BOT|>user\n<im_patch>What is this?<|EOT|>"
        "<|BOT|>assistant\nA black square.<|EOT|>"
        "<|BOT|>user\nAnd this one: <im_patch>?<|EOT|>"
        "<|BOT|>assistant\n<think>\n")
    assert len(images) == 2 and images[0] is img and images[1] == uri


def test_no_system_no_generation_prompt() -> None:
    text, images = render_chat([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}],
                               add_generation_prompt=False)
    assert text == f"{BOS}<|BOT|>user\nHi<|EOT|><|BOT|>assistant\nHello!<|EOT|>"
    assert images == []


def test_image_url_as_plain_string_and_unicode_text() -> None:
    text, images = render_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": "/tmp/x.png"}, {"type": "text", "text": "日本 ✓\n"}]}])
    assert text == f"{BOS}<|BOT|>user\n<im_patch>日本 ✓\n<|EOT|><|BOT|>assistant\n<think>\n"
    assert images == ["/tmp/x.png"]


@pytest.mark.parametrize("messages, needle", [
    ("hello", "list of dicts"),
    ([], "empty"),
    (["hi"], "expected a dict"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "not the first"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 42}], "content is a int"),
    ([{"role": "user", "content": ["text"]}], "expected a dict with a 'type'"),
    ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "type 'video'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "not a string"),
    ([{"role": "user", "content": [{"type": "image"}]}], "without an 'image'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "without a url"),
    ([{"role": "system", "content": [{"type": "image", "image": "a.png"}]}], "system message"),
    ([{"role": "user", "content": "look <im_patch>"}], "image placeholder"),
])
def test_malformed_messages_raise_prompt_error(messages: object, needle: str) -> None:
    with pytest.raises(PromptError) as ei:
        render_chat(messages)  # type: ignore[arg-type]
    assert needle in ei.value.problem and ei.value.remedy


def test_load_chat_template_from_folder_and_fallback(tmp_path) -> None:
    assert load_chat_template(tmp_path) == DEFAULT_CHAT_TEMPLATE          # no file at all
    write_tokenizer_files(tmp_path)
    assert load_chat_template(tmp_path) == DEFAULT_CHAT_TEMPLATE          # written default
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    write_tokenizer_files(tmp_path, chat_template=custom)
    tpl = load_chat_template(tmp_path)
    assert tpl == custom
    assert render_chat([{"role": "user", "content": "x"}], tpl) == ("[user]x", [])
    cfg_file = tmp_path / "tokenizer_config.json"
    data = json.loads(cfg_file.read_text(encoding="utf-8"))
    data.pop("chat_template")
    cfg_file.write_text(json.dumps(data), encoding="utf-8")
    assert load_chat_template(tmp_path) == DEFAULT_CHAT_TEMPLATE
    data["chat_template"] = 7
    cfg_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError):
        load_chat_template(tmp_path)
    cfg_file.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_chat_template(tmp_path)


def test_bad_templates() -> None:
    msgs = [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]
    with pytest.raises(ConfigError):
        render_chat(msgs, "{% for m in messages %}")                      # does not compile
    with pytest.raises(PromptError, match="no assistant"):
        render_chat(msgs, "{{ raise_exception('no assistant allowed') }}")
    with pytest.raises(PromptError, match="0 <im_patch> placeholders for 1 images"):
        render_chat(msgs, "{{ bos_token }}")                              # drops the image


def test_sandbox_blocks_attribute_escape() -> None:
    with pytest.raises((PromptError, ConfigError)):
        render_chat([{"role": "user", "content": "x"}],
                    "{{ messages.__class__.__mro__[1].__subclasses__() }}")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{% for a in messages * 9999 %}{% for b in messages * 9999 %}{% for c in messages * 9999 %}"
    "{% endfor %}{% endfor %}{% endfor %}",
])
def test_a_template_that_runs_for_ever_stops_with_a_prompt_error(monkeypatch, template) -> None:
    import time

    import step3_edge.chat as chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    t0 = time.monotonic()
    with pytest.raises(PromptError, match="rendering took longer than 0.3 s"):
        render_chat([{"role": "user", "content": "hi"}], template)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10**10 }}", "{{ 'a'|center(10**10) }}", "{{ 'a'.ljust(10**10) }}",
    "{{ 9 ** 9 ** 9 }}", "{{ '%1000000000d' % 1 }}", "{{ '{:>1000000000}'.format('a') }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{% set x = 'ab' * 4000000 %}{{ x.replace('', x) }}",
    "{{ range(99999)|join('x' * 9999999) }}",
    "{{ ('a\\n' * 4000000)|indent(9999) }}",
])
def test_a_template_that_grows_without_bound_is_refused_before_allocating(template) -> None:
    with pytest.raises(PromptError, match="chat template stopped"):
        render_chat([{"role": "user", "content": "hi"}], template)


def test_an_oversized_template_is_a_config_error() -> None:
    from step3_edge.chat import MAX_TEMPLATE_CHARS

    with pytest.raises(ConfigError, match="at most"):
        render_chat([{"role": "user", "content": "hi"}], "x" * (MAX_TEMPLATE_CHARS + 1))


def test_bounded_sandbox_still_renders_ordinary_templates() -> None:
    import random

    words = ["".join(random.choice("abcdefgh") for _ in range(6)) for _ in range(5)]
    msgs = [{"role": "user", "content": w} for w in words]
    t = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
         "{{ m['content']|upper|replace('A', 'a') }}{{ ','.join(['x', 'y']) }}{% endfor %}"
         "{{ ns.n }}{{ '%d' % 7 }}{{ '{}!'.format(1) }}")
    text, _ = render_chat(msgs, t)
    assert text == "".join(w.upper().replace("A", "a") + "x,y" for w in words) + "57" + "1!"
