"""Moved to :mod:`moma_core.objectives.crckd`; this path names the same module."""

import sys

from moma_core.objectives import crckd as _crckd

sys.modules[__name__] = _crckd
