"""`step3-edge` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

from step3_edge.errors import Step3EdgeError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("step3_edge.synth", "write a synthetic Step3 checkpoint in the real layout"),
    "generate": ("step3_edge.generate", "generate text (checkpoint: reference model; bundle: runtime)"),
    "eval": ("step3_edge.evaluate", "exact-match accuracy on the held-out shapes task"),
    "quantize": ("step3_edge.quantize.cli", "requantize a checkpoint for a target card"),
    "plan": ("step3_edge.runtime.plan_cli", "print the device placement and memory plan"),
    "export": ("step3_edge.export.cli", "export a checkpoint into per-device engine bundles"),
    "inspect": ("step3_edge.export.inspect_cli", "summarise a bundle and verify its hashes"),
    "chat": ("step3_edge.runtime.chat_cli", "interactive streaming chat with a bundle"),
    "profile": ("step3_edge.runtime.profile_cli", "record per-layer expert counts for planning"),
    "app": ("step3_edge.app.gradio_app", "Gradio image-chat demo"),
    "serve": ("step3_edge.app.server", "OpenAI-compatible HTTP server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step3-edge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Step3EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
