"""Moved to :mod:`moma_core.objectives.dp_moma`; this path names the same module."""

import sys

from moma_core.objectives import dp_moma as _dp_moma

sys.modules[__name__] = _dp_moma
