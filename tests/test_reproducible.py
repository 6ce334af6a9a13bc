"""Same seed on the same machine → the same weights (standalone; the site's round is tested in
test_site_training)."""

from __future__ import annotations

import json

import torch

from moma_core.cli.distill import distill, parser
from tests.helpers import IMAGE_SIZE, tiny_teacher


def _distill(tmp_path, name: str, seed: int) -> str:
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    args = parser().parse_args([
        "--teacher", str(teacher), "--name", name, "--runs-dir", str(tmp_path / "runs"),
        "--n", "48", "--test-n", "0", "--epochs", "1", "--batch-size", "16",
        "--image-size", str(IMAGE_SIZE), "--queue-size", "64", "--augment", "randaugment",
        "--stain-jitter", "0.05",
        "--seed", str(seed)])
    torch.manual_seed(hash(name) % 1000)  # whatever ran before in the process must not matter
    distill(args)
    return json.loads((tmp_path / "runs" / name / "results.json").read_text())["student_sha256"]


def test_moma_distill_with_one_seed_gives_the_same_weights(tmp_path):
    """MoMA on a teacher of another task: fresh classifier head, projection heads, attention
    and queue, RandAugment and shuffling all come from the seed."""
    first, second = _distill(tmp_path, "a", 3), _distill(tmp_path, "b", 3)
    assert first == second
    assert _distill(tmp_path, "c", 4) != first
