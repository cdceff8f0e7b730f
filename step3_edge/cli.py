"""`step3-edge` command line: the table of commands, and the conventions they share.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the module of the command being run is imported, so `step3-edge --help` starts without
torch. The shared conventions live here: one `--model PATH` flag (checkpoint or bundle, see
`add_model_argument` / `resolve_bundle`), the runtime options of `chat`, `profile`, `app` and
`serve` (`RUNTIME_OPTIONS`, generated from the fields of `step3_edge.runtime.options.
RuntimeOptions` and mapped onto `Step3Runtime.load` keywords by `runtime_overrides`),
and a help formatter that shows every option's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3_edge.errors import Step3EdgeError

DESCRIPTION = """\
Deploy StepFun's Step3 vision-language model on small accelerators:
checkpoint -> quantize -> export bundle -> runtime (terminal chat, an OpenAI-compatible
server, a Gradio demo)."""
EPILOG = """\
examples:
  step3-edge generate "What colour is the circle?" --image photo.png
  step3-edge plan --preset full --target l20
  step3-edge export --model CKPT --target cpu --out BUNDLE
  step3-edge chat --model BUNDLE
  step3-edge serve --model BUNDLE --api-key KEY
  step3-edge app

--model takes a checkpoint folder (config.json) or an exported bundle (manifest.json);
where it is optional, the embedded default model is used. `step3-edge COMMAND --help` lists
a command's options."""

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("step3_edge.synth_cli", "write a synthetic Step3 checkpoint in the real layout"),
    "generate": ("step3_edge.generate", "answer one prompt (checkpoint: reference model; "
                 "bundle: runtime)"),
    "eval": ("step3_edge.evaluate", "exact-match accuracy on the held-out shapes task"),
    "quantize": ("step3_edge.quantize.cli", "requantize a checkpoint for a target card"),
    "plan": ("step3_edge.runtime.plan_cli", "print the device placement and memory plan"),
    "export": ("step3_edge.export.cli", "export a checkpoint into per-device engine bundles"),
    "inspect": ("step3_edge.export.inspect_cli", "summarise a bundle and verify its hashes"),
    "chat": ("step3_edge.runtime.chat_cli", "interactive streaming chat in the terminal"),
    "profile": ("step3_edge.runtime.profile_cli", "record per-layer expert counts for planning"),
    "app": ("step3_edge.app.gradio_app", "Gradio image-chat demo in the browser"),
    "serve": ("step3_edge.app.server", "OpenAI-compatible HTTP server"),
}


def version() -> str:
    """The installed distribution's version (the source tree's where it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("step3-edge")
    except PackageNotFoundError:
        from step3_edge import __version__

        return __version__


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help states it already or there is none
    to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text is argparse.SUPPRESS or "default" in text or "%(default)" in text:
            return text
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


# ------------------------------------------------------------------ the model flag
class _DeprecatedBundle(argparse.Action):
    """`--bundle PATH`: the old name of `--model` (hidden from --help, still accepted)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print("step3-edge: --bundle is deprecated; use --model (it takes a bundle or a "
              "checkpoint)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_model_argument(p: argparse.ArgumentParser, *, default: str = "the embedded default "
                       "model") -> None:
    """`--model PATH` (checkpoint or bundle, optional) and its hidden old name `--bundle`."""
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder (config.json; exported for the cpu target into the "
                   "cache on first use) or engine bundle (manifest.json) "
                   f"(default: {default})")
    p.add_argument("--bundle", dest="model", metavar="PATH", action=_DeprecatedBundle,
                   help=argparse.SUPPRESS)


def resolve_bundle(model: str | Path | None, *, progress: bool = True) -> tuple[Path, str | None]:
    """The bundle to load for `--model`, and the name to show for it (None: the folder's).

    A bundle is used as it is; a checkpoint is exported once for the cpu target into the
    cache folder (reused while it is unchanged); None is the embedded default model."""
    from step3_edge.app.default_bundle import DEFAULT_NAME, bundle_for, default_bundle

    if model is None:
        return default_bundle(progress=progress), DEFAULT_NAME
    bundle = bundle_for(model, progress=progress)
    return bundle, (None if bundle == Path(model).expanduser() else Path(model).resolve().name)


# ------------------------------------------------------------------ runtime options
def checked_number(convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool],
                   bound: str) -> Callable[[str], Any]:
    """An argparse `type`: `convert` the text (else "is not `kind`") and check it with `ok`
    (else "is `bound`")."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is {bound}")
        return value
    return parse


positive_int = checked_number(int, "a whole number", lambda v: v >= 1, "below 1")
nonnegative_int = checked_number(int, "a whole number", lambda v: v >= 0, "below 0")
_fraction = checked_number(float, "a number", lambda v: 0 <= v <= 1, "outside [0, 1]")
positive_float = checked_number(float, "a number", lambda v: v > 0, "not above 0")
port_number = checked_number(int, "a port number", lambda v: 1 <= v <= 65535,
                             "outside 1..65535")


def _resident(text: str) -> int | float:
    """A fraction when written with a decimal point (0.5, 1.0), else a count of experts."""
    try:
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.5) nor a count "
                                         "of experts (12)") from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1] (fraction) / >= 0 (count)")
    return value


@dataclass(frozen=True)
class RuntimeOption:
    """One command-line option of the runtime commands and the `Step3Runtime.load` keyword
    it sets, made from a `RuntimeOptions` field (`step3_edge.runtime.options`)."""

    flag: str
    key: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None
    action: Any = None
    to_load: Callable[[Any], Any] | None = None    # CLI value -> load keyword value


# a field's value kind -> its argparse form
_KINDS: dict[str, dict[str, Any]] = {
    "count": {"type": positive_int}, "kv_tokens": {"type": positive_int},
    "count0": {"type": nonnegative_int}, "fraction": {"type": _fraction},
    "seconds": {"type": positive_float}, "bool": {"action": argparse.BooleanOptionalAction},
    "tristate": {"action": argparse.BooleanOptionalAction}, "choice": {}, "device": {},
    "devices": {"nargs": "+"}, "counts": {},
    "afd": {"nargs": "?", "const": "spawn", "to_load": lambda v: True if v == "spawn" else v},
}


def _runtime_options() -> tuple[RuntimeOption, ...]:
    """The runtime flags, one per `RuntimeOptions` field with a command-line form (help,
    choices and kind from the field), plus `--resident` (the load keyword's shorthand: a
    fraction written with a decimal point, else a count)."""
    from step3_edge.runtime.options import RESIDENT_HELP, option_fields

    out = []
    for _, f in option_fields():
        m = f.metadata
        if not m["flag"]:
            continue
        out.append(RuntimeOption("--" + m["key"].replace("_", "-"), m["key"], m["help"],
                                 choices=m["choices"] or None, metavar=m["metavar"],
                                 **_KINDS[m["kind"]]))
        if m["key"] == "resident_fraction":
            out.append(RuntimeOption("--resident", "resident", RESIDENT_HELP, type=_resident,
                                     metavar="FRACTION|COUNT"))
    return tuple(out)


RUNTIME_OPTIONS: tuple[RuntimeOption, ...] = _runtime_options()


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """The runtime options (`RUNTIME_OPTIONS`) as a group of `p`'s options."""
    g = p.add_argument_group("runtime options (Step3Runtime.load)")
    for o in RUNTIME_OPTIONS:
        kw: dict[str, Any] = {"help": o.help, "default": None,
                              "dest": o.key}
        for name in ("type", "choices", "metavar", "nargs", "const", "action"):
            if getattr(o, name) is not None:
                kw[name] = getattr(o, name)
        g.add_argument(o.flag, **kw)


def runtime_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `Step3Runtime.load` keywords of the runtime options given (options a command
    lacks, or left at their default, are skipped)."""
    out: dict[str, Any] = {}
    for o in RUNTIME_OPTIONS:
        value = getattr(args, o.key, None)
        if value is not None:
            out[o.key] = o.to_load(value) if o.to_load else value
    return out


# ------------------------------------------------------------------ the parser
def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of `argv` (the top-level options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (imports every command module), or, with `only`, one in
    which only that command's options are registered (what `main` uses; `only=""` registers
    none, enough for the top-level --help)."""
    parser = argparse.ArgumentParser(prog="step3-edge", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"step3-edge {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        if only is None or only == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Step3EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "RUNTIME_OPTIONS", "HelpFormatter", "add_model_argument",
           "add_runtime_arguments", "build_parser", "checked_number", "main",
           "nonnegative_int", "port_number", "positive_float", "positive_int", "resolve_bundle",
           "runtime_overrides", "version"]

if __name__ == "__main__":
    sys.exit(main())
