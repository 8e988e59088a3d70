"""Fixtures of the Slicer-side tests (real MRML through slicer-core): a fresh scene per test and one segmented
BTCV case per session, from slicer_support.py (whose helpers the tests import by name)."""

from slicer_support import scene, segmented  # noqa: F401  (fixtures: pytest finds them here)
