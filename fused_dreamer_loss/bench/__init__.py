"""The benchmark (``fused-dreamer-loss-bench``)."""

from .workloads import *  # noqa: F401,F403
from .workloads import main, run  # noqa: F401
