"""`step3-edge app`: the Gradio image-chat demo.

The interface only: a chat with image upload or paste, streamed answers, sampling controls,
example prompts, and a side panel with the device plan, memory in use and the statistics of the
last answer. Every model step happens in the runtime behind `app.engine.ChatEngine`.

The API endpoint `/chat` (gradio_client: `client.predict(message, temperature, top_p,
max_tokens, history, api_name="/chat")`) is stateless: each call answers `message` (text and
image files) after the optional `history` ([{"role": "user" | "assistant", "content": str}]),
never after an earlier call's turns. It streams (answer text, side-panel statistics): the
model's text as the OpenAI server returns it (reasoning, `</think>`, answer), without the chat's
markup; errors are raised (gradio_client's AppError) with the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from step3_edge import defaults
from step3_edge.app.engine import add_server_arguments
from step3_edge.errors import Step3EdgeError
from step3_edge.tokenizer import THINK_END

log = logging.getLogger("step3_edge.app")

ERROR_PREFIX = "⚠️ "
THINK_SHOWN = f"`{THINK_END}`"    # the reasoning / answer boundary as the chat shows it
EXAMPLES = (  # (image file in defaults.EXAMPLES, question)
    ("shapes.png", "What colour is the circle?"),
    ("three_shapes.png", "Describe the image."),
    ("four_shapes_wide.png", "How many shapes are there?"),
    ("shapes.png", "Which shape is on the left?"),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_SLIDER = 2048


# ------------------------------------------------------------------ history -> chat messages
def _parts(content: Any) -> list[Any]:
    return content if isinstance(content, list) else [content]


def _convert_part(part: Any) -> dict[str, Any] | None:
    """One Gradio content part -> a step3-edge chat part (None for what the model cannot see)."""
    if isinstance(part, str):
        return {"type": "text", "text": part} if part else None
    if not isinstance(part, dict):
        return None
    if part.get("type") == "text":
        return {"type": "text", "text": part.get("text") or ""}
    file = part.get("file") if part.get("type") == "file" else part
    path = file.get("path") if isinstance(file, dict) else None
    mime = (file.get("mime_type") or "") if isinstance(file, dict) else ""
    if path and (mime.startswith("image/") or str(path).lower().endswith(IMAGE_SUFFIXES)):
        return {"type": "image", "image": str(path)}
    return None


def _text_of(content: Any) -> str:
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p)
                   for p in _parts(content) if isinstance(p, (str, dict)))


def history_to_messages(history: list[dict[str, Any]],
                        message: dict[str, Any]) -> list[dict[str, Any]]:
    """Gradio chat history plus the new multimodal message -> step3-edge chat messages.

    Earlier images stay in the conversation. A turn whose answer was an error note (a corrupt
    image, say) is dropped with that note, so one bad upload does not poison later turns.
    """
    turns: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []       # user parts since the last assistant answer
    for msg in history:
        role = msg.get("role")
        if role == "user":
            pending.extend(p for p in map(_convert_part, _parts(msg.get("content")))
                           if p is not None)
        elif role == "assistant":
            text = _text_of(msg.get("content"))
            if text.startswith(ERROR_PREFIX):
                pending = []
                continue
            text = text.rpartition(THINK_SHOWN)[2]     # earlier turns keep their answers only
            if pending:
                turns.append({"role": "user", "content": pending})
                pending = []
            if turns and turns[-1]["role"] == "assistant":
                turns[-1]["content"] += text      # an answer streamed in several bubbles
            elif turns:
                turns.append({"role": "assistant", "content": text})
    parts = pending + [{"type": "image", "image": _file_path(f)} for f in message.get("files", [])]
    if message.get("text"):
        parts.append({"type": "text", "text": message["text"]})
    turns.append({"role": "user", "content": parts})
    return turns


def _file_path(f: Any) -> str:
    return str(f.get("path") if isinstance(f, dict) else f)


# ------------------------------------------------------------------ side panel
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def stats_markdown(engine: Any, answer: Any | None) -> str:
    """The side panel's statistics: the last answer and the memory in use now."""
    mem = engine.memory()
    lines = ["### Last answer"]
    s = answer.stats if answer is not None else None
    if s is None:
        lines.append("_no answer yet_" if answer is None else "_generating…_")
    else:
        lines += [
            f"- tokens: **{s.prompt_tokens}** prompt, **{s.completion_tokens}** answer "
            f"({s.finish_reason})",
            f"- time to first token: **{_secs(s.first_token_s)}**",
            f"- speed: **{s.tokens_per_s:.1f} tokens/s**",
            f"- expert-cache hit rate: **{_pct(s.expert_hit_rate)}**",
        ]
    lines += ["", "### Memory",
              f"- this process (RSS): **{_gib(mem['rss'])}**",
              f"- system in use: **{_gib(mem['used'])}** of {_gib(mem['total'])}",
              f"- system available: **{_gib(mem['available'])}**"]
    return "\n".join(lines)


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


# ------------------------------------------------------------------ the app
def shown(text: str) -> str:
    """A streamed answer as the chat shows it: the model's reasoning, `</think>` as code (a
    bare tag would vanish in the Markdown), then the answer; each update extends the last."""
    return text.replace(THINK_END, THINK_SHOWN)


def make_respond(engine: Any) -> Any:
    """The chat function: yields (answer so far, side-panel markdown) while streaming."""

    def respond(message: dict[str, Any], history: list[dict[str, Any]], temperature: float,
                top_p: float, max_tokens: float) -> Iterator[tuple[str, str]]:
        message = message if isinstance(message, dict) else {"text": str(message), "files": []}
        if not (message.get("text") or "").strip() and not message.get("files"):
            yield ERROR_PREFIX + "Type a question (and add an image if you like).", \
                stats_markdown(engine, None)
            return
        answer = None
        text = ""
        messages: list[dict[str, Any]] = []
        try:
            messages = history_to_messages(history, message)
            answer = engine.answer(messages,
                                   max_tokens=int(max_tokens), temperature=float(temperature),
                                   top_p=float(top_p))
            for piece in answer:
                text += piece
                yield shown(text), stats_markdown(engine, answer)
        except Step3EdgeError as e:
            yield (ERROR_PREFIX + _user_error(e, text, _image_paths(messages)),
                   stats_markdown(engine, answer or engine.last_answer))
            return
        except Exception as e:  # noqa: BLE001 - a bug must not take down the queue
            log.exception("answer failed")
            yield (ERROR_PREFIX + f"Internal error ({type(e).__name__}: {e}); see the server "
                   "log."), stats_markdown(engine, answer)
            return
        finally:
            if answer is not None:
                answer.close()
        if not text.strip():
            n = answer.stats.completion_tokens if answer.stats else 0
            text = f"_(the model produced {n} tokens with no printable text)_"
        yield shown(text), stats_markdown(engine, answer)

    return respond


def _user_error(e: Step3EdgeError, partial: str, paths: Sequence[str] = ()) -> str:
    from step3_edge.app.extras import plain_text

    text = plain_text(e.problem + (f" — {e.remedy}" if e.remedy else ""))
    return _without_paths(text + (f"\n\n(partial answer: {partial})" if partial else ""), paths)


def _without_paths(text: str, paths: Sequence[str]) -> str:
    """`text` with the server's paths of uploaded files cut to their file names."""
    for path in sorted(set(paths), key=len, reverse=True):
        if path:
            text = text.replace(path, Path(path).name)
    return text


def _image_paths(messages: list[dict[str, Any]]) -> list[str]:
    return [str(p["image"]) for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and isinstance(p.get("image"), str)]


def _api_history(history: Any) -> list[dict[str, Any]]:
    """The `/chat` API's optional history -> chat messages; a bad one is a PromptError."""
    from step3_edge.errors import PromptError

    if history in (None, "", []):
        return []
    if not isinstance(history, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), str) for m in history):
        raise PromptError("history must be a list of {\"role\": \"user\" or \"assistant\", "
                          "\"content\": text}", "pass earlier turns in that shape, or none")
    return [{"role": m["role"], "content": m["content"]} for m in history]


def make_api(engine: Any) -> Any:
    """The stateless `/chat` API function: yields (answer text so far, side-panel markdown);
    a bad request or image raises gr.Error with the reason."""

    def chat(message: Any, temperature: float, top_p: float, max_tokens: float,
             history: Any = None) -> Iterator[tuple[str, str]]:
        import gradio as gr

        message = message if isinstance(message, dict) else {"text": str(message or ""),
                                                               "files": []}
        if not (message.get("text") or "").strip() and not message.get("files"):
            raise gr.Error("the message has no text and no image; send a question")
        answer, text, paths = None, "", []
        try:
            messages = _api_history(history) + history_to_messages([], message)
            paths = _image_paths(messages)
            answer = engine.answer(messages, max_tokens=int(max_tokens),
                                   temperature=float(temperature), top_p=float(top_p))
            for piece in answer:
                text += piece
                yield text, stats_markdown(engine, answer)
        except Step3EdgeError as e:
            raise gr.Error(_user_error(e, "", paths), print_exception=False) from None
        finally:
            if answer is not None:
                answer.close()
        yield text, stats_markdown(engine, answer)

    return chat


def _theme(gr: Any) -> Any:
    # system fonts only: the page must not wait on font servers an offline machine cannot reach
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_demo(engine: Any, *, concurrency: int = 4) -> Any:
    """The Gradio Blocks of the demo for a loaded `ChatEngine`."""
    from step3_edge.app.extras import require

    gr = require("gradio", "gradio", "the Gradio demo (step3-edge app)")
    # uploads older than a day are deleted (checked hourly)
    with gr.Blocks(title="step3-edge", fill_height=True, analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## step3-edge · {engine.name}\nUpload or paste an image, ask a question, "
                    "and watch the answer stream in.")
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature",
                                info="0 = greedy", render=False, elem_id="temperature")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", render=False,
                          elem_id="top_p")
        max_tokens = gr.Slider(1, min(engine.max_tokens_limit, MAX_TOKENS_SLIDER),
                               value=DEFAULT_MAX_TOKENS, step=1,
                               label="max tokens", render=False, elem_id="max_tokens")
        stats = gr.Markdown(stats_markdown(engine, None), render=False, elem_id="stats")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gr.ChatInterface(
                    make_respond(engine),
                    multimodal=True,
                    chatbot=gr.Chatbot(height=520, label="chat", elem_id="chatbot",
                                       feedback_options=None, autoscroll=True),
                    textbox=(textbox := gr.MultimodalTextbox(
                        file_types=["image"], file_count="multiple", sources=["upload"],
                        placeholder="Ask about an image: attach, drop or paste one, then type",
                        elem_id="chat_input", autofocus=True, stop_btn=True)),
                    additional_inputs=[temperature, top_p, max_tokens],
                    additional_inputs_accordion=gr.Accordion("Sampling", open=False, render=False),
                    additional_outputs=[stats],
                    examples=_examples(),
                    cache_examples=False,
                    run_examples_on_click=True,
                    concurrency_limit=concurrency,
                    # the chat's own endpoint keeps the conversation in the session: the
                    # stateless `/chat` below is the API
                    api_name="chat_ui",
                    api_visibility="private",
                    fill_height=True,
                )
            with gr.Column(scale=1, min_width=300):
                stats.render()
                refresh = gr.Button("Refresh memory", size="sm")
                with gr.Accordion("Device plan", open=False):
                    gr.Markdown(f"```\n{engine.plan_table()}\n```", elem_id="plan")
        api_message = gr.MultimodalTextbox(visible=False, file_types=["image"],
                                           file_count="multiple")
        api_history = gr.JSON(visible=False, value=None)
        api_answer = gr.Textbox(visible=False, label="answer")
        gr.Button(visible=False).click(
            make_api(engine), [api_message, temperature, top_p, max_tokens, api_history],
            [api_answer, stats], api_name="chat", concurrency_limit=concurrency,
            show_progress="hidden")
        refresh.click(lambda: stats_markdown(engine, engine.last_answer), None, stats,
                      queue=False, api_visibility="undocumented")
        textbox.stop(_after_stop(engine), None, stats, queue=False,
                     api_visibility="undocumented")
    return demo


def _after_stop(engine: Any) -> Any:
    def panel() -> str:
        time.sleep(0.3)          # the cancelled answer closes once its current token is out
        return stats_markdown(engine, engine.last_answer)

    return panel


def _examples() -> list[list[dict[str, Any]]] | None:
    found = [(defaults.EXAMPLES / name, q) for name, q in EXAMPLES
             if (defaults.EXAMPLES / name).is_file()]
    return [[{"text": q, "files": [str(p)]}] for p, q in found] or None


def launch(engine: Any, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           concurrency: int = 4, queue_size: int = 64, max_upload: str = "20mb",
           block: bool = True) -> Any:
    """Build, queue and launch the demo; returns the Blocks (running in the background when
    `block` is False, stop it with `.close()`)."""
    demo = build_demo(engine, concurrency=concurrency)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    import gradio as gr

    demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_upload,
                allowed_paths=[str(defaults.EXAMPLES)] if defaults.EXAMPLES.is_dir() else None,
                theme=_theme(gr), ssr_mode=False, show_error=True, quiet=False,
                prevent_thread_lock=not block, footer_links=["api", "settings"])
    return demo


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from step3_edge.cli import positive_int

    add_server_arguments(p, port=7860)
    g = p.add_argument_group("app options")
    g.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (needs internet access)")
    g.add_argument("--concurrency", type=positive_int, default=4, metavar="N",
                   help="answers generated at once (the runtime batches them); more wait in "
                   "the queue")
    g.add_argument("--queue-size", type=positive_int, default=64, metavar="N",
                   help="requests allowed to wait")
    g.add_argument("--max-upload", default="20mb", metavar="SIZE",
                   help="largest accepted upload, e.g. 20mb")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from step3_edge.app.engine import ChatEngine
    from step3_edge.app.extras import import_in_background
    from step3_edge.cli import runtime_overrides

    gradio_import = import_in_background("gradio", "gradio", "the Gradio demo (step3-edge app)")
    import torch

    # the browser of a local demo (127.0.0.1 by default) and Gradio need a core while the
    # engine thread steps: its OpenMP workers spin between ops (runtime/openmp.py)
    overrides = {"threads": max(1, torch.get_num_threads() - 1), **runtime_overrides(args)}
    engine = ChatEngine.load(args.model, **overrides)
    gradio_import.join()
    print(f"step3-edge app: {engine.name} loaded from {engine.bundle}", file=sys.stderr)
    launch(engine, host=args.host, port=args.port, share=args.share,
           concurrency=args.concurrency, queue_size=args.queue_size, max_upload=args.max_upload)
    return 0
