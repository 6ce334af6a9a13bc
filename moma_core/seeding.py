"""Seeds derived from a run's seed: same inputs → same seed, on every machine and process.

A site derives its round seed from the run seed, its own name and the round, so two sites never
share a shuffle order, and a simulated and a deployed run of one seed train alike. Python's
``hash()`` is salted per process, so a cryptographic hash is used instead.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (their ``str``), stable across processes and machines."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    """Seed every generator the training path draws from: torch (CPU and CUDA), and Python's
    ``random`` and numpy's global generator (timm's RandAugment draws from both)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
