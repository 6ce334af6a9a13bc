"""A short real distillation on CPU: the MoMA student beats CE-only from the same init.

Setting: a same-task teacher trained on plenty of synthetic target data; a site with few
labelled images (64). Both students start from the same random init and see the same data,
augmentation and optimiser; MoMA adds the teacher (KL + momentum-contrast NCE, frozen teacher).
"""

import numpy as np
import pytest
import torch

from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import ObjectiveConfig, build_objective, same_task
from moma_core.sources import make_loader, open_eval_data, open_site_data
from moma_core.train import TrainConfig, train_local

SIZE = 40
EPOCHS = 50  # 200 steps: short runs leave both students undertrained and the gap noisy


def _train(kind, data, teacher, seed, epochs):
    torch.manual_seed(100 + seed)
    student = build_model(Architecture("test_efficientnet", tuple(data.classes), SIZE))
    objective = build_objective(
        ObjectiveConfig(kind=kind, queue_size=256, teacher_update="frozen"), student, teacher,
        same_task(data.classes, data.classes) if teacher is not None else None)
    loader = make_loader(data.train, 16, train=True, seed=seed)
    train_local(student, objective, loader,
                TrainConfig(epochs=epochs, lr=0.003, optimizer="adamw", seed=seed))
    return student


@pytest.mark.slow  # an accuracy check: trains three students
def test_moma_student_beats_ce_only_on_held_out_data():
    source = open_site_data("synthetic:target", SIZE, "flip", seed=5, n=1200)
    teacher = _train("ce", source, None, seed=0, epochs=5)
    test = make_loader(open_eval_data("synthetic:target", SIZE, seed=0, n=400), 128, False)
    teacher_acc = evaluate(teacher, test, 4)["accuracy"]
    gains = []
    for seed in (0, 1, 2):
        site = open_site_data("synthetic:target", SIZE, "randaugment", seed=seed, n=64)
        ce = evaluate(_train("ce", site, None, seed, EPOCHS), test, 4)["accuracy"]
        moma = evaluate(_train("moma", site, teacher, seed, EPOCHS), test, 4)["accuracy"]
        print(f"seed {seed}: teacher {teacher_acc:.3f} CE-only {ce:.3f} MoMA {moma:.3f}")
        gains.append(moma - ce)
    assert teacher_acc > 0.65
    # Measured gains are ~0.10-0.14 per seed; float results differ between CPUs by a few
    # points, so the bar sits well below the measured gain and well above zero.
    assert min(gains) > 0.02 and np.mean(gains) > 0.05
