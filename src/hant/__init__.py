"""hant: hardware-aware network transformation.

Import has no side effects; heavy modules are imported on first use of the names below.
"""

from hant.errors import HantError

__version__ = "0.1.0"

__all__ = ["HantError", "__version__", "accelerate", "load_student"]


def __getattr__(name: str):
    # Lazy so that `import hant` stays cheap and does not import torch.
    if name == "load_student":
        from hant.student import load_student

        return load_student
    if name == "accelerate":
        from hant.api import accelerate

        return accelerate
    raise AttributeError(f"module 'hant' has no attribute {name!r}")
