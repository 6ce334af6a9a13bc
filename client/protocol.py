"""What crosses the wire between coordinator and site, by record key.

Coordinator → site (train): ``arrays`` (global student, float tensors), ``config`` (round,
training settings, ``teacher-sha256``), and — only when the site lacks it — ``teacher`` (the
teacher's safetensors file as raw bytes) with ``teacher-meta`` (its sidecar JSON).
Coordinator → site (query ``teacher-status``): ``config`` with ``teacher-sha256``.
Site → coordinator: ``arrays`` (its new student, train only) and ``metrics`` (aggregate losses
and metrics, ``num-examples``). Nothing else leaves a site: no images, features, logits, queue,
memory bank or path.
"""

from __future__ import annotations

import numpy as np
import torch

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
TEACHER = "teacher"
TEACHER_META = "teacher-meta"
TEACHER_FILE = "teacher.safetensors"
TEACHER_SHA = "teacher-sha256"
TEACHER_STATUS = "query.teacher_status"
NUM_EXAMPLES = "num-examples"


def wire_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a student that travel: floating point only (BN counters stay home)."""
    return {k: v.detach().cpu() for k, v in state.items() if v.is_floating_point()}


def bytes_to_array(data: bytes) -> np.ndarray:
    """Raw file bytes as a uint8 array (so a file travels inside an ArrayRecord, chunked)."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def array_to_bytes(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError("a file on the wire is a 1-D uint8 array")
    return array.tobytes()
