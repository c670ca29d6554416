"""hant: hardware-aware network transformation.

Import has no side effects; heavy modules are imported by the stages that need them.
"""

from hant.errors import HantError

__version__ = "0.1.0"

__all__ = ["HantError", "__version__"]
