"""Boundary methods (``boundary=<name>``): the model built so that what crosses a stage boundary is small.

Built-in: ``none`` (base), ``subspace``, ``bottleneck``, ``columns``. See ``docs/compression.md``.
"""

from lowbw.boundary import bottleneck, columns, subspace  # noqa: F401  (register the methods)
from lowbw.boundary.base import METHODS, TOKEN_ID_BYTES, BoundaryMethod, build_method, register_method

__all__ = ["METHODS", "TOKEN_ID_BYTES", "BoundaryMethod", "build_method", "register_method"]
