"""Classifier backbones by timm name: build, pooled feature + logits, architecture description.

Every network in MoMA-FL is a plain timm model created with ``pretrained=False``; the pooled
feature is ``forward_head(forward_features(x), pre_logits=True)`` taken *before* the head's
dropout (as the reference's projection heads see it), and the logits are the model's own
classifier applied to the dropped-out feature, exactly as ``model(x)`` computes them. Any timm
backbone is swappable by name.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """What is needed to rebuild a classifier: timm name, class names, input geometry."""

    model_name: str
    classes: tuple[str, ...]
    image_size: int = 64
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    drop_rate: float = 0.2
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        return cls(
            model_name=d["model_name"],
            classes=tuple(d["classes"]),
            image_size=int(d.get("image_size", 64)),
            mean=tuple(d.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(d.get("std", (0.229, 0.224, 0.225))),
            drop_rate=float(d.get("drop_rate", 0.2)),
            extra=dict(d.get("extra", {})),
        )


def create_classifier(model_name: str, num_classes: int, drop_rate: float = 0.2) -> nn.Module:
    """A timm classifier with a fresh head of ``num_classes`` (never downloads weights)."""
    try:
        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate
        )
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ValueError(f"unknown timm model {model_name!r}: {exc}") from exc


def check_input_size(model_name: str, image_size: int) -> None:
    """Refuse (ValueError) a model that cannot classify ``image_size`` px images: an unknown
    name, a fixed input size (ViTs made for 224 px), or more downsampling than the image has
    pixels. One forward pass of an untrained model on one black image."""
    model = create_classifier(model_name, 2).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except Exception as exc:  # timm and torch raise many kinds here
        raise ValueError(f"{model_name} cannot take {image_size} px images: {exc}") from None


#: ``Architecture.extra["norm"]``: "batch" (the timm model as built) or "group" (every
#: BatchNorm a GroupNorm: a student trained with DP-SGD, see moma_core.privacy.dp_sgd), with
#: ``extra["group-size"]`` channels per group (absent: gcd(32, channels) groups, the rule of
#: checkpoints written before it existed).
NORMS = ("batch", "group")


def build_model(arch: Architecture) -> nn.Module:
    """The classifier described by ``arch`` (GroupNorm instead of BatchNorm when
    ``arch.extra["norm"] == "group"``)."""
    model = create_classifier(arch.model_name, arch.num_classes, arch.drop_rate)
    norm = arch.extra.get("norm", "batch")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r} in the architecture; one of {NORMS}")
    if norm == "group":
        from moma_core.privacy.dp_sgd import make_private_compatible

        size = arch.extra.get("group-size")
        model = make_private_compatible(model, group_size=int(size) if size else None)
    return model


def feature_dim(model: nn.Module) -> int:
    """Dimension of the pooled (pre-logits) feature that :func:`features_and_logits` returns.

    timm's ``num_features`` is the backbone's output; models with a hidden layer after pooling
    (MobileNetV3/V4, GhostNet: 576 → 1024) feed the classifier ``head_hidden_size`` features.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled feature ``f`` (B×d, before dropout) and logits ``z`` (B×C) in one forward pass.

    timm's ``forward_head(pre_logits=True)`` applies the classifier's dropout in training mode;
    MoMA's projection head must see the feature without it (at drop rate 0.5, half of g_s's
    input would be zeros). The head's dropout is switched off for the pooled feature and applied
    here, on the way to the classifier only. Handled: heads that read ``model.drop_rate``
    (EfficientNet, ResNet, MobileNet) and heads with a ``head_drop``/``head.drop`` module (ViT,
    ConvNeXt, RegNet); any other head keeps its own behaviour.
    """
    feats = model.forward_features(x)
    owner, attr = _head_dropout(model)
    if owner is None:
        f = model.forward_head(feats, pre_logits=True)
        return f, model.get_classifier()(f)
    rate = float(getattr(owner, attr))
    setattr(owner, attr, 0.0)
    try:
        f = model.forward_head(feats, pre_logits=True)
    finally:
        setattr(owner, attr, rate)
    z = model.get_classifier()(F.dropout(f, p=rate, training=model.training) if rate else f)
    return f, z


_READS_DROP_RATE: dict[type, bool] = {}


def _head_dropout(model: nn.Module) -> tuple[object | None, str]:
    """(object, attribute) holding the head's dropout probability, or (None, "")."""
    kind = type(model)
    if kind not in _READS_DROP_RATE:
        try:
            source = inspect.getsource(kind.forward_head)
        except (AttributeError, OSError, TypeError):
            source = ""
        _READS_DROP_RATE[kind] = "self.drop_rate" in source
    if _READS_DROP_RATE[kind] and isinstance(getattr(model, "drop_rate", None), (int, float)):
        return model, "drop_rate"
    for module in (getattr(model, "head_drop", None),
                   getattr(getattr(model, "head", None), "drop", None)):
        if isinstance(module, nn.Dropout):
            return module, "p"
    return None, ""


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers (kept local by FedBN)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, norms):
            prefix = f"{name}." if name else ""
            keys |= {prefix + k for k in module.state_dict()}
    return keys
