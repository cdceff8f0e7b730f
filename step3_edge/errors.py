"""Errors a user can cause. Each names the bad value, what was expected and the remedy."""

from __future__ import annotations


class Step3EdgeError(Exception):
    """Base of every error step3-edge raises for bad input, bad files or impossible plans."""

    def __init__(self, problem: str, remedy: str = "") -> None:
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{problem}" + (f"\n  remedy: {remedy}" if remedy else ""))


class ConfigError(Step3EdgeError):
    """config.json is missing, unreadable or holds a field of the wrong type or value."""


class CheckpointError(Step3EdgeError):
    """A safetensors file or index is corrupt, truncated, or its tensors do not match the config."""


class ImageError(Step3EdgeError):
    """An image cannot be decoded, or is too large to process safely."""


class PromptError(Step3EdgeError):
    """A prompt or message list is malformed or longer than the context allows."""


class PlanError(Step3EdgeError):
    """A placement plan does not fit the devices and memory given."""


class BundleError(Step3EdgeError):
    """An engine bundle is incomplete, tampered with, or names a path outside itself."""


class QuantizationError(Step3EdgeError):
    """A quantization scheme or recipe was asked for that does not exist or does not apply."""


class RuntimeClosedError(Step3EdgeError, RuntimeError):
    """A request reached a runtime that was closed (or was pending when it closed)."""

    def __init__(self, problem: str = "the runtime is closed") -> None:
        super().__init__(problem, "load the bundle again (Step3Runtime.load)")


class MissingExtraError(Step3EdgeError):
    """An optional package needed for this feature is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the package '{package}', which is not installed",
            f"pip install 'step3-edge[{extra}]'",
        )
