"""Tests for the synthetic H&E generator: determinism, labels, site styles and difficulty."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from moma_core.data.synthetic import (
    SOURCE_CLASSES,
    TARGET_CLASSES,
    TASKS,
    SiteStyle,
    generate,
    site_styles,
    synthetic_dataset,
)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("size", [32, 64, 80])
def test_shapes_and_dtypes(task: str, size: int) -> None:
    images, labels = generate(task, 12, seed=0, image_size=size)
    assert images.shape == (12, size, size, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(TASKS[task])
    assert images.std() > 10  # not a blank canvas


def test_tasks_and_classes() -> None:
    assert TASKS == {"source": SOURCE_CLASSES, "target": TARGET_CLASSES}
    assert len(SOURCE_CLASSES) == len(TARGET_CLASSES) == 4
    assert not set(SOURCE_CLASSES) & set(TARGET_CLASSES)


def test_deterministic_by_seed_and_task() -> None:
    a_img, a_lab = generate("source", 40, seed=3)
    b_img, b_lab = generate("source", 40, seed=3)
    assert a_img.tobytes() == b_img.tobytes() and np.array_equal(a_lab, b_lab)
    c_img, _ = generate("source", 40, seed=4)
    d_img, _ = generate("target", 40, seed=3)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_img, d_img)


def test_classes_balanced_by_default() -> None:
    _, labels = generate("target", 101, seed=1)
    counts = np.bincount(labels, minlength=4)
    assert counts.sum() == 101 and counts.max() - counts.min() <= 1


def test_class_probs_skew_is_exact() -> None:
    _, labels = generate("source", 200, seed=1, class_probs=[0.7, 0.2, 0.1, 0.0])
    assert np.bincount(labels, minlength=4).tolist() == [140, 40, 20, 0]
    _, unnormalized = generate("source", 200, seed=1, class_probs=[7, 2, 1, 0])
    assert np.array_equal(labels, unnormalized)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "tissue"}, "source"),
        ({"image_size": 16}, "image_size"),
        ({"class_probs": [1.0, 1.0]}, "class_probs"),
        ({"class_probs": [1.0, -1.0, 1.0, 1.0]}, "class_probs"),
        ({"n": -1}, "n"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"task": "source", "n": 4, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(**args)


def test_site_styles_deterministic_and_distinct() -> None:
    styles = site_styles(4, seed=0)
    assert styles == site_styles(4, seed=0)
    assert styles != site_styles(4, seed=1)
    assert len(set(styles)) == 4
    assert all(s.brightness > 0 and s.blur_sigma >= 0 and s.noise >= 0 for s in styles)
    assert site_styles(3, seed=5, strength=0.0) == [SiteStyle.identity()] * 3
    with pytest.raises(ValueError):
        SiteStyle(stain_shift=(0.1, 0.2))


def test_site_style_changes_colour_but_not_labels() -> None:
    base, base_labels = generate("source", 64, seed=2, style=SiteStyle.identity())
    for style in [SiteStyle(stain_shift=(0.3, 0.3, 0.1)), *site_styles(2, seed=0)]:
        shifted, labels = generate("source", 64, seed=2, style=style)
        assert np.array_equal(labels, base_labels)
        diff = np.abs(shifted.reshape(-1, 3).mean(0) - base.reshape(-1, 3).mean(0))
        assert diff.max() > 3.0, (style, diff)


def test_blur_and_noise_act_on_high_frequencies() -> None:
    def roughness(images: np.ndarray) -> float:
        return float(np.abs(np.diff(images.astype(float), axis=2)).mean())

    sharp, _ = generate("target", 16, seed=0)
    blurred, _ = generate("target", 16, seed=0, style=SiteStyle(blur_sigma=1.5))
    noisy, _ = generate("target", 16, seed=0, style=SiteStyle(noise=8.0))
    assert roughness(blurred) < 0.8 * roughness(sharp)
    assert roughness(noisy) > 1.2 * roughness(sharp)


def test_synthetic_dataset_wraps_generate() -> None:
    ds = synthetic_dataset("target", 8, seed=0, image_size=32)
    images, labels = generate("target", 8, seed=0, image_size=32)
    assert ds.classes == list(TARGET_CLASSES) and ds.targets == labels.tolist()
    image, label = ds[3]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), images[3]) and label == labels[3]
    tensor, _ = synthetic_dataset("target", 2, 0, 32, transform=lambda im: np.asarray(im))[0]
    assert tensor.shape == (32, 32, 3)


# --------------------------------------------------------------------------- difficulty check


def _colour_histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
    feats = [
        np.concatenate([np.histogram(im[..., c], bins, (0, 256))[0] for c in range(3)])
        for im in images
    ]
    return np.asarray(feats, float) / (images.shape[1] * images.shape[2])


def _histogram_accuracy(train: tuple, test: tuple) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    clf.fit(_colour_histograms(train[0]), train[1])
    return float(clf.score(_colour_histograms(test[0]), test[1]))


def _tiny_cnn(n_classes: int) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes),
    )  # fmt: skip


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)


@pytest.fixture
def one_torch_thread():
    """Tiny convs run fastest single-threaded; extra threads only spin on a busy CI box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cnn_accuracy(train: tuple, test: tuple, epochs: int = 8, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = _tiny_cnn(4)
    x, y = _to_tensor(train[0]), torch.from_numpy(train[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            xb = x[idx].flip(3) if torch.rand(1) < 0.5 else x[idx]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(_to_tensor(test[0])).argmax(1).numpy()
    return float((pred == test[1]).mean())


@pytest.mark.parametrize("task", ["source", "target"])
@pytest.mark.usefixtures("one_torch_thread")
def test_morphology_not_colour_carries_the_class(task: str) -> None:
    """A colour-histogram classifier must do clearly worse than a tiny CNN (product spec)."""
    train = generate(task, 800, seed=11, image_size=48)
    test = generate(task, 400, seed=12, image_size=48)
    hist_acc = _histogram_accuracy(train, test)
    cnn_acc = _cnn_accuracy(train, test)
    print(f"[difficulty] {task}: colour-histogram acc={hist_acc:.3f}, tiny CNN acc={cnn_acc:.3f}")
    assert cnn_acc > 0.6
    assert cnn_acc >= hist_acc + 0.15
