"""step3-edge: deploy StepFun Step3 on low-end accelerators."""

from step3_edge.config import Step3Config
from step3_edge.errors import Step3EdgeError

__all__ = ["Step3Config", "Step3EdgeError", "Step3ForConditionalGeneration"]
__version__ = "0.1.0"


def __getattr__(name: str):  # the model imports torch; keep `import step3_edge` light
    if name == "Step3ForConditionalGeneration":
        from step3_edge.model import Step3ForConditionalGeneration

        return Step3ForConditionalGeneration
    raise AttributeError(name)
