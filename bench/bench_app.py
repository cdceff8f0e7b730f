"""App benchmark: `step3-edge app` to a usable page on a fresh and on a warm cache,
and time to first token / tokens per second as the browser sees them.

A usable page: the app answers HTTP and Debian's chromium (through playwright) has loaded it
and shows the chat input. Fresh cache: an empty STEP3_EDGE_CACHE, so the default model is
exported (and, while no trained default ships, synthesised) first. The browser measures the
answer with a MutationObserver on the chat: time from the click on send to the first text of
the answer, then (answer tokens - 1) / (time from first to last text change), the answer's
token count read off the side panel. Prints a table, writes bench/results/app.json and
bench/results/app_screenshot.png.

    python bench/bench_app.py [--questions 3] [--repeat 2] [--model B] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "app"))
from hostinfo import host, results_path  # noqa: E402
from app_helpers import (EXAMPLES, ask_in_browser, default_is_trained,  # noqa: E402
                         launch_browser, open_app, spawn, stop)

MIN_TOKENS = 8
QUESTIONS = [("shapes.png", "What colour is the circle?"),     # the last one is on the
             ("four_shapes_wide.png", "How many shapes are there?"),  # screenshot
             ("three_shapes.png", "Describe the image.")]


def time_to_usable(browser: object, args: list[str], env: dict[str, str], log: Path
                   ) -> tuple[float, float, object, object]:
    """Seconds from spawning the command to HTTP ready and to a usable page (in a new browser
    context: nothing cached); the server and the page."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()  # type: ignore
    t0 = time.monotonic()
    served = spawn(args, "/", log, env)
    http_s = time.monotonic() - t0
    open_app(page, served.url + "/")
    return http_s, time.monotonic() - t0, served, page


def measure_answer(page: object, image: Path, question: str) -> dict:
    """One question in a new conversation (the chat's clear button first)."""
    clear = page.query_selector("#chatbot button[aria-label=Clear]")  # type: ignore
    if clear is not None:
        clear.click()
        page.wait_for_function(  # type: ignore
            "() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")
    out = ask_in_browser(page, image, question)
    seen = out["seen"]
    m = re.search(r"(\d+)\*\* answer", out["stats"].replace("\n", " ")) or \
        re.search(r"(\d+) answer", out["stats"])
    tokens = int(m.group(1)) if m else 0
    ttft = (seen[0]["t"] - out["sent"]) / 1000 if seen else None
    span = (seen[-1]["t"] - seen[0]["t"]) / 1000 if len(seen) > 1 else 0.0
    return {"question": question, "image": image.name, "answer": seen[-1]["text"] if seen else "",
            "answer_tokens": tokens, "updates_seen": len(seen), "ttft_s": ttft, "span_s": span,
            "tokens_per_s": (tokens - 1) / span if span > 0 and tokens > 1 else None,
            "panel": out["stats"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="starts of each kind (median kept)")
    ap.add_argument("--out", help="JSON results (default bench/results/app-<machine>.json)")
    ap.add_argument("--model", help="measure this bundle instead of the default model "
                    "(then only the warm start is timed)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    results: dict = {"host": {**host(), "python": platform.python_version()},
                     "default_model_trained": default_is_trained(), "bundle": args.model}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        env = dict(os.environ, GRADIO_TEMP_DIR=f"{tmp}/gradio",
                   GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        cmd = ["app"] + (["--model", args.model] if args.model else [])
        browser = launch_browser(p)
        try:
            for kind in (["fresh_cache"] if not args.model else []) + ["warm_cache"]:
                runs = []
                for i in range(args.repeat):
                    cache = f"{tmp}/cache-{i}" if kind == "fresh_cache" else f"{tmp}/cache-0"
                    env["STEP3_EDGE_CACHE"] = cache
                    http_s, usable_s, served, page = time_to_usable(
                        browser, cmd, env, Path(tmp, f"{kind}-{i}.log"))
                    runs.append({"http_ready_s": http_s, "usable_page_s": usable_s})
                    if kind == "fresh_cache" or i < args.repeat - 1:
                        stop(served.proc)
                results[kind] = {"runs": runs, **{k: statistics.median(r[k] for r in runs)
                                                  for k in ("http_ready_s", "usable_page_s")}}
            try:
                answers = [measure_answer(page, EXAMPLES / img, q)
                           for img, q in (QUESTIONS * 3)[:args.questions]]
                shot = REPO / "bench" / "results" / "app_screenshot.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
            finally:
                stop(served.proc)
        finally:
            browser.close()
    results["answers"] = answers
    ttfts = [a["ttft_s"] for a in answers if a["ttft_s"] is not None]
    long = [a for a in answers if a["answer_tokens"] >= MIN_TOKENS and a["span_s"] > 0]
    results["summary"] = {
        "ttft_s_median": statistics.median(ttfts) if ttfts else None,
        # pooled over answers of >= MIN_TOKENS tokens: a 3-token answer times nothing
        "tokens_per_s": (sum(a["answer_tokens"] - 1 for a in long) / sum(a["span_s"] for a in long)
                         if long else None),
        "tokens_per_s_answers": len(long)}
    out = Path(args.out) if args.out else results_path("app", results["host"])
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"default model trained: {results['default_model_trained']}")
    for k in ("fresh_cache", "warm_cache"):
        if k in results:
            r = results[k]
            print(f"{k:12s} HTTP ready {r['http_ready_s']:6.2f} s   usable page "
                  f"{r['usable_page_s']:6.2f} s  (median of {len(r['runs'])}: "
                  + ", ".join(f"{x['usable_page_s']:.2f}" for x in r["runs"]) + ")")
    for a in answers:
        ttft = "-" if a["ttft_s"] is None else f"{a['ttft_s']:.2f} s"
        tps = "-" if not a["tokens_per_s"] else f"{a['tokens_per_s']:.1f}"
        print(f"{a['image']:22s} {a['question']:30s} TTFT {ttft:>8s}  tokens/s {tps:>6s}  "
              f"({a['answer_tokens']} tokens, {a['updates_seen']} updates) {a['answer'][:40]!r}")
    summ = results["summary"]
    print(f"median TTFT {summ['ttft_s_median']} s; tokens/s seen by the browser "
          f"{summ['tokens_per_s']} (pooled over {summ['tokens_per_s_answers']} answers of "
          f">= {MIN_TOKENS} tokens)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
