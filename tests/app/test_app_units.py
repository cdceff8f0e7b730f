"""Pure parts of the app: history -> chat messages, OpenAI request validation, CLI wiring."""

from __future__ import annotations

import subprocess
import sys

import pytest

from step3_edge.app.gradio_app import ERROR_PREFIX, history_to_messages, shown
from step3_edge.app.openai_protocol import ApiError, parse_chat_request


def _file(path: str) -> dict:
    return {"type": "file", "file": {"path": path, "mime_type": "image/png"}}


def test_history_keeps_earlier_images_and_answers_and_drops_failed_turns() -> None:
    """Earlier turns keep their images and their answers (not the reasoning before `</think>`)."""
    history = [
        {"role": "user", "content": [_file("/tmp/a.png"), {"type": "text", "text": "colour?"}]},
        {"role": "assistant",
         "content": [{"type": "text", "text": shown("circle red</think>red")}]},
        {"role": "user", "content": [_file("/tmp/bad.png"), {"type": "text", "text": "and?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ERROR_PREFIX + "bad image"}]},
    ]
    msgs = history_to_messages(history, {"text": "How many shapes?", "files": []})
    assert msgs == [
        {"role": "user", "content": [{"type": "image", "image": "/tmp/a.png"},
                                     {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "How many shapes?"}]},
    ]


def test_new_message_files_come_before_its_text() -> None:
    msgs = history_to_messages([], {"text": "what?", "files": ["/x/b.jpg", {"path": "/x/c.png"}]})
    assert msgs == [{"role": "user", "content": [
        {"type": "image", "image": "/x/b.jpg"}, {"type": "image", "image": "/x/c.png"},
        {"type": "text", "text": "what?"}]}]


def test_parse_chat_request_maps_openai_to_step3_messages() -> None:
    req = parse_chat_request({
        "model": "m", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "x",
        "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                         {"type": "text", "text": "hi"}]}]}, "m")
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert req.messages[1]["content"][0]["type"] == "image_url"
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream,
            req.include_usage) == (5, 0.0, 0.5, ("x",), True, True)


@pytest.mark.parametrize("body, status, param", [
    ([], 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     400, "messages[0].content[0]"),
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_parse_chat_request_rejects(body: object, status: int, param: str | None) -> None:
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, "m")
    assert e.value.status == status
    assert e.value.body()["error"]["param"] == param
    assert e.value.body()["error"]["message"]


def test_cli_help_lists_app_and_serve_without_importing_gradio() -> None:
    code = ("import sys; from step3_edge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('gradio', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    helps = subprocess.run([sys.executable, "-m", "step3_edge.cli", "app", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--model" in helps and "--share" in helps and "127.0.0.1" in helps


@pytest.mark.parametrize("command, blocked", [("app", "gradio"), ("serve", "fastapi"),
                                              ("serve", "uvicorn")])
def test_a_missing_package_names_the_app_extra(command: str, blocked: str) -> None:
    code = (f"import sys; sys.modules[{blocked!r}] = None; from step3_edge.cli import main; "
            f"sys.exit(main([{command!r}, '--model', '/nonexistent']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert f"'{blocked}'" in out.stderr and "step3-edge[app]" in out.stderr


def test_runtime_options_of_app_and_serve() -> None:
    import argparse

    from step3_edge.app.engine import add_server_arguments
    from step3_edge.cli import runtime_overrides

    p = argparse.ArgumentParser()
    add_server_arguments(p, port=1)
    assert runtime_overrides(p.parse_args([])) == {}
    args = p.parse_args(["--threads", "3", "--device", "cpu", "--kv-tokens", "512",
                         "--resident", "0.5", "--miss", "cpu", "--backend", "torch", "--afd"])
    assert runtime_overrides(args) == {"threads": 3, "device": "cpu", "kv_tokens": 512,
                                       "resident": 0.5, "miss": "cpu", "backend": "torch",
                                       "afd": True}
    assert runtime_overrides(p.parse_args(["--resident", "12", "--afd", "env"])) == {
        "resident": 12, "afd": "env"}
