"""Arguments shared by the command-line tools, and their clean failure."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

from moma_core.errors import CheckpointError, DataError, TrainingDiverged


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that names each option's default, ``(default: 64)``, options without a help
    text included; not where there is none to name (unset, off, empty) or where the help text
    already speaks of its default."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shown_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shown_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _shown_default(action: argparse.Action) -> bool:
    default = action.default
    if not action.option_strings or default is None or default is False:
        return False
    return default is not argparse.SUPPRESS and default not in ("", [])


#: moma-distill's options that are run settings (generated from the settings tree's local
#: training part, moma_core.run_settings.LocalTraining)
TRAINING_SETTINGS = ("batch-size", "lr", "optimizer")
DATA_SETTINGS = ("augment",)


def add_training_args(p: argparse.ArgumentParser, epochs: int, lr: float,
                      settings: bool = False) -> argparse._ArgumentGroup:
    """Training options; ``settings``: batch size, learning rate and optimiser are the run
    settings' (the caller adds them to the returned group, generated from the settings tree)."""
    p.formatter_class = DefaultsHelpFormatter  # every command with these options shows defaults
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    if not settings:
        g.add_argument("--batch-size", type=int, default=64)
        g.add_argument("--lr", type=float, default=lr)
        g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    return g


def add_data_args(p: argparse.ArgumentParser, source: str | None, n: int,
                  settings: bool = False) -> argparse._ArgumentGroup:
    """Data options; ``settings``: augmentation is the run settings' (the caller adds it to the
    returned group, generated from the settings tree)."""
    p.formatter_class = DefaultsHelpFormatter  # every command with these options shows defaults
    g = p.add_argument_group("data")
    g.add_argument("--source", default=source,
                   help="synthetic:source | synthetic:target | ImageFolder dir | .csv | .npz")
    g.add_argument("--n", type=int, default=n, help="synthetic: training images")
    g.add_argument("--site-index", type=int, default=None,
                   help="synthetic: simulated hospital style (default: none)")
    g.add_argument("--num-sites", type=int, default=3)
    g.add_argument("--image-size", type=int, default=64)
    if not settings:
        g.add_argument("--augment", choices=["randaugment", "flip", "none"],
                       default="randaugment")
    g.add_argument("--stain-jitter", type=float, default=0.0, help="HED jitter strength")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted) instead of failing")
    g.add_argument("--allow-outside-paths", action="store_true",
                   help="a CSV manifest may name images outside its folder")
    return g


def run_cli(main: Callable[[], int]) -> Callable[[], int]:
    """Turn the project's own errors into one clear line and exit code 2."""
    def wrapper() -> int:
        try:
            return main()
        except (DataError, CheckpointError, TrainingDiverged, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapper
