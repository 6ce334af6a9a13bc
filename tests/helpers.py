"""Helpers shared by the federation tests: a tiny teacher and small run settings."""

from __future__ import annotations

from pathlib import Path

import torch

from moma_core.checkpoint import save_checkpoint
from moma_core.data.synthetic import SOURCE_CLASSES, TARGET_CLASSES
from moma_core.models import Architecture, build_model

IMAGE_SIZE = 32


def tiny_teacher(path: Path, classes=SOURCE_CLASSES) -> Path:
    """An untrained (random, seeded) test_efficientnet teacher; enough for plumbing tests."""
    torch.manual_seed(0)
    arch = Architecture("test_efficientnet", tuple(classes), IMAGE_SIZE)
    save_checkpoint(path, build_model(arch).state_dict(), arch, {"purpose": "tests"})
    return path


def tiny_run(**overrides):
    """Small run settings; ``overrides`` by run-config key in snake_case."""
    from moma_protocol.settings import RunConfig

    values = dict(run_name="t", num_rounds=2, student_model="test_efficientnet",
                  classes=",".join(TARGET_CLASSES), image_size=IMAGE_SIZE, local_epochs=1,
                  batch_size=16, lr=0.003, optimizer="adamw", augment="flip", queue_size=64,
                  min_train_nodes=2, min_available_nodes=2, round_timeout=600.0)
    values.update(overrides)
    return RunConfig.from_flat({k.replace("_", "-"): v for k, v in values.items()})


def synthetic_sites(root: Path, n_sites: int, n: int = 48) -> list[dict]:
    return [{"data-path": "synthetic:target", "cache-dir": str(root / f"site-{i}"),
             "site-index": i, "num-sites": n_sites, "n": n, "site-name": f"site-{i}",
             "device": "cpu"} for i in range(n_sites)]


def site_with_teacher(root: Path):
    """One synthetic site (under ``root``) whose cache already holds a tiny teacher; returns
    (site settings, the teacher's SHA-256)."""
    import json

    from client.site_config import site_settings
    from client.site_state import TeacherCache
    from moma_core.checkpoint import sidecar_path

    teacher = tiny_teacher(root / "teacher.safetensors")
    settings = site_settings(synthetic_sites(root, 1)[0])
    sidecar = json.loads(sidecar_path(teacher).read_text())
    TeacherCache(settings.cache_dir).store(teacher.read_bytes(), sidecar, sidecar["sha256"])
    return settings, sidecar["sha256"]
