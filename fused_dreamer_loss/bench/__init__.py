"""The benchmark (``fused-dreamer-loss-bench``)."""

from .cli import *  # noqa: F401,F403
from .cli import main, run  # noqa: F401
