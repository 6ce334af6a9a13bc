"""``moma-bench accuracy``: options, mean ± std and the table, reruns, and a common start.

The fast tests start no federation: option checks (one line, exit code 2), the aggregation of
hand-made per-seed results against numbers computed by hand, skipping and redoing finished arms
(with the real local-only arm on tiny data), and the local-only and centralised arms starting
from the federated arms' round-1 student. One slow test runs a minimal ``--quick`` benchmark end
to end through Flower's simulation engine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moma_bench import benchmark
from moma_bench.arms import (
    Scenario,
    arm,
    metrics_from_confusion,
    run_local,
    setup,
)
from moma_core.data.synthetic import SOURCE_CLASSES, TARGET_CLASSES
from moma_core.models import Architecture
from moma_protocol.wire import wire_state
from server.baseline import start_student
from server.server_app import initial_student, state_digest
from server.teacher_package import package_teacher
from tests.helpers import tiny_teacher

TINY = ["--quick", "--n", "24", "--eval-n", "8", "--rounds", "1"]


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["moma-bench", *argv])
    rc = benchmark.main()
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tiny(tmp_path: Path, task: str, *extra: str):
    """Checked options and the scenario of a tiny synthetic benchmark, teacher in place."""
    args = benchmark.check_options(benchmark.parser().parse_args(
        ["accuracy", *TINY, "--tasks", task, "--out", str(tmp_path / "out"), *extra]))
    sc = benchmark.scenarios(args)[0]
    tiny_teacher(sc.teacher, TARGET_CLASSES if task == "same" else SOURCE_CLASSES)
    return args, benchmark.check_scenario(sc, args)


# -- options ----------------------------------------------------------------------------------
def test_installed_script_refuses_an_unknown_arm_in_one_line(tmp_path):
    script = Path(sys.executable).parent / "moma-bench"
    r = subprocess.run([str(script), "accuracy", "--quick", "--arms", "fedavg-moma", "nope",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown arm 'nope'" in r.stderr and "local-only" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, text", [
    (["--arms", "local-only", "fedavg-mona"], "unknown arm 'fedavg-mona'"),
    (["--seeds", "0", "1"], "at least 3 seeds"),
    (["--quick", "--seeds", "0", "0"], "distinct seeds"),
    (["--quick", "--seeds", "x"], "invalid int value"),
    (["--quick", "--tasks", "similar"], "unknown task 'similar'"),
    (["--quick", "--sites", "1"], "at least 2 sites"),
    (["--quick", "--rounds", "0"], "--rounds 0"),
    (["--quick", "--lr", "-1"], "lr"),
    (["--quick", "--optimizer", "rmsprop"], "optimizer"),
    (["--quick", "--teacher", "t.safetensors"], "--teacher is for --site-data"),
    (["--quick", "--data", "{tmp}", "--teacher", "t.safetensors", "--teacher-model", "resnet18"],
     "--teacher-model is for teachers the benchmark trains"),
    (["--quick", "--teacher-model", "resnet_nope"], "--teacher-model 'resnet_nope': not a timm"),
    (["--quick", "--model", "effnet"], "--model 'effnet': not a timm model"),
    (["--quick", "--teacher-model", "vit_tiny_patch16_224"],
     "vit_tiny_patch16_224 cannot take 32 px images"),
    (["--quick", "--site-data", "{tmp}/a", "{tmp}/b"], "no such file or directory"),
    (["--quick", "--site-data", "{tmp}"], "at least 2"),
    (["--quick", "--site-data", "{tmp}", "{tmp}", "--data", "{tmp}"], "exclude each other"),
    (["--quick", "--site-data", "{tmp}", "{tmp}", "--sites", "2"], "leave --sites out"),
    (["--quick", "--data", "{tmp}", "--partitioner", "bogus"], "--partitioner 'bogus'"),
    (["--quick", "--data", "{tmp}", "--label-skew", "0.1"], "--label-skew is for"),
    (["--quick", "--site-data", "{tmp}", "{tmp}", "--teacher", "{tmp}/t.safetensors"],
     "no such file"),
    ([], "required"),
])
def test_bad_options_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, text):
    argv = [a.format(tmp=tmp_path) for a in argv]
    command = ["accuracy", "--out", str(tmp_path / "out"), *argv] if argv else []
    rc, _, err = _main(monkeypatch, capsys, *command)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert text in err
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


# -- aggregation and the table ----------------------------------------------------------------
def _result(arm_name: str, seed: int, pooled: float, site_a: float, site_b: float,
            nce: tuple[float, float]) -> dict:
    sites = {name: {"accuracy": acc, "macro_f1": acc / 2, "kappa": acc - 0.5, "num_examples": 10}
             for name, acc in (("site-0", site_a), ("site-1", site_b))}
    return {"arm": arm_name, "seed": seed, "status": "ok", "kl_on": True, "init": "teacher",
            "init_digest": f"start-{seed}", "steps_per_site": {"site-0": 4.0, "site-1": 6.0},
            "pooled": {"accuracy": pooled, "macro_f1": pooled / 2, "kappa": pooled - 0.5},
            "sites": sites,
            "rounds": [{"train-nce": nce[0], "train-kl": 0.1, "train-ce": 1.0},
                       {"train-nce": nce[1], "train-kl": 0.2, "train-ce": None}]}


def test_mean_and_sample_std_over_seeds_by_hand():
    results = [_result("fedavg-moma", 2, 0.8, 0.9, 0.7, (3.0, 0.1)),
               _result("fedavg-moma", 0, 0.6, 0.5, 0.7, (1.0, 0.5)),
               _result("fedavg-moma", 1, 0.7, 0.6, 0.8, (2.0, 0.0))]
    agg = benchmark.aggregate(results)
    assert agg["seeds"] == [0, 1, 2]
    # pooled accuracy 0.6, 0.7, 0.8: mean 0.7, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert agg["pooled"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert agg["pooled"]["accuracy"]["std"] == pytest.approx(0.1)
    assert agg["pooled"]["macro_f1"]["mean"] == pytest.approx(0.35)
    assert agg["pooled"]["kappa"]["std"] == pytest.approx(0.1)
    # site means per seed: (0.5+0.7)/2 = 0.6, (0.6+0.8)/2 = 0.7, (0.9+0.7)/2 = 0.8
    assert agg["site_mean"]["accuracy"]["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert agg["site_mean"]["accuracy"]["std"] == pytest.approx(0.1)
    # site-0 over seeds: 0.5, 0.6, 0.9 → mean 2/3, std sqrt(0.08667 / 2) = 0.20817
    assert agg["sites"]["site-0"]["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert agg["sites"]["site-0"]["accuracy"]["std"] == pytest.approx(0.208167, abs=1e-6)
    # per-round terms: mean over seeds; a term missing in any seed is None
    assert agg["rounds"]["train-nce"] == pytest.approx([2.0, 0.2])
    assert agg["rounds"]["train-ce"] == [1.0, None]
    assert benchmark.fmt(agg["pooled"]["accuracy"]) == "0.700 ± 0.100"
    assert benchmark.fmt(benchmark.mean_std([0.25])) == "0.250"  # one seed: no std


def test_metrics_from_a_confusion_matrix_by_hand():
    m = metrics_from_confusion([[3, 1], [1, 3]])
    # accuracy 6/8; F1 of each class 0.75; kappa (0.75 − 0.5) / (1 − 0.5)
    assert (m["accuracy"], m["macro_f1"], m["kappa"], m["num_examples"]) == \
        pytest.approx((0.75, 0.75, 0.5, 8))
    m = metrics_from_confusion([[2, 0], [2, 0]])  # everything predicted as class 0
    assert (m["accuracy"], m["macro_f1"], m["kappa"]) == pytest.approx((0.5, 1 / 3, 0.0))


def test_summary_table_json_and_plots_from_results_on_disk(tmp_path):
    args = benchmark.check_options(benchmark.parser().parse_args(
        ["accuracy", "--out", str(tmp_path), "--arms", "local-only", "fedavg-ce", "fedavg-kd",
         "fedavg-moma"]))
    sc = Scenario("same-task-3sites", tmp_path / "teacher.safetensors", (), task="same")
    for seed, (moma, ce, local) in enumerate([(0.6, 0.5, 0.4), (0.7, 0.6, 0.5),
                                              (0.8, 0.7, 0.3)]):
        for name, acc in (("fedavg-moma", moma), ("fedavg-ce", ce), ("local-only", local)):
            path = benchmark.result_path(tmp_path, sc, seed, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_result(name, seed, acc, acc, acc, (1.0, 0.0))))
        benchmark.result_path(tmp_path, sc, seed, "fedavg-kd").write_text(json.dumps(
            {"arm": "fedavg-kd", "seed": seed, "status": "n/a", "reason": "needs same task"}))
    summary = benchmark.summarise(args, [sc], "moma-bench accuracy")
    benchmark.write_summary(tmp_path, summary)
    saved = json.loads((tmp_path / "summary.json").read_text())
    arms = saved["scenarios"]["same-task-3sites"]["arms"]
    assert arms["fedavg-moma"]["pooled"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert arms["local-only"]["pooled"]["accuracy"]["mean"] == pytest.approx(0.4)
    assert arms["fedavg-kd"]["status"] == "n/a"
    assert saved["scenarios"]["same-task-3sites"]["same_start"] is True
    md = (tmp_path / "summary.md").read_text()
    assert "| fedavg-moma | 3 | 0.700 ± 0.100 | 0.350 ± 0.050 | 0.200 ± 0.100 | 0.700 ± 0.100 |" \
        in md
    assert "| local-only | 3 | 0.400 ± 0.100 |" in md
    assert "| fedavg-kd | – |" in md and "n/a: needs same task" in md
    assert "5 per site" in md  # mean local steps of the two sites
    assert "fedavg-moma − fedavg-ce: pooled accuracy +0.100" in md
    assert "fedavg-moma − local-only: pooled accuracy +0.300" in md
    # paired over seeds: differences 0.2, 0.2, 0.5 → mean 0.3, sample std sqrt(0.03), 95 %
    # half-width t(2) · std / sqrt(3) = 4.303 · 0.1732 / 1.732 = 0.430
    assert "pooled accuracy +0.300 [-0.130, +0.730]" in md
    assert "fedavg-moma − fedavg-ce: pooled accuracy +0.100 [+0.100, +0.100]" in md
    comp = saved["scenarios"]["same-task-3sites"]["comparisons"]
    local = next(c for c in comp if c["against"] == "local-only")
    assert local["goal"] == "P7" and local["accuracy"]["values"] == pytest.approx([0.2, 0.2, 0.5])
    assert benchmark.paired(arms["fedavg-moma"], arms["fedavg-kd"], "accuracy") is None  # n/a arm
    # a run of other arms only (no FedAvg CE, no local arm): no comparison, no crash
    only = {"fedavg-moma": arms["fedavg-moma"]}
    assert benchmark.comparisons(only) == []
    for png in ("same-task-3sites-metrics.png", "same-task-3sites-terms.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000


# -- reruns -----------------------------------------------------------------------------------
def test_rerun_keeps_finished_arms_and_force_redoes_them(tmp_path, monkeypatch, capsys):
    argv = ["accuracy", *TINY, "--tasks", "same", "--arms", "local-only", "--out",
            str(tmp_path / "out")]
    args, sc = _tiny(tmp_path, "same")
    path = benchmark.result_path(args.out, sc, 0, "local-only")

    rc, out, _ = _main(monkeypatch, capsys, *argv)
    assert rc == 0 and "seed 0 local-only (at " in out and "pooled accuracy" in out
    first = json.loads(path.read_text())
    assert first["status"] == "ok" and set(first["sites"]) == {"site-0", "site-1", "site-2"}

    rc, out, _ = _main(monkeypatch, capsys, *argv)
    assert rc == 0 and "local-only: done earlier, kept" in out
    assert json.loads(path.read_text()) == first

    rc, out, _ = _main(monkeypatch, capsys, *argv, "--force")
    assert rc == 0 and "done earlier" not in out
    again = json.loads(path.read_text())
    assert again["wall_s"] != first["wall_s"]  # trained again
    assert again["pooled"] == first["pooled"]  # same seed, same result

    rc, _, err = _main(monkeypatch, capsys, *argv, "--rounds", "2")  # other settings
    assert rc == 2 and "made with other settings" in err and len(err.strip().splitlines()) == 1
    assert json.loads(path.read_text()) == again


def _two_class_folder(root: Path, seed: int) -> Path:
    """An ImageFolder of two classes that are not the synthetic task's (12 images each)."""
    from PIL import Image

    from moma_core.data.synthetic import generate

    images, labels = generate("target", 48, seed=seed, image_size=32)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        if y in (0, 3):
            folder = root / ("low" if y == 0 else "high")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_one_dataset_per_site_with_the_local_arms(tmp_path, monkeypatch, capsys):
    a = _two_class_folder(tmp_path / "hospital-a", 1)
    b = _two_class_folder(tmp_path / "hospital-b", 2)
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")  # the source task's classes
    out = tmp_path / "out"
    rc, stdout, err = _main(monkeypatch, capsys, "accuracy", "--quick", "--rounds", "1",
                            "--arms", "local-only", "centralised-moma", "--site-data", str(a),
                            str(b), "--teacher", str(teacher), "--out", str(out))
    assert rc == 0, err
    assert stdout.count("pooled accuracy") == 2
    sc = json.loads((out / "summary.json").read_text())["scenarios"]["site-data-2sites"]
    assert sc["task"] == "different" and sc["same_start"] is True
    for name in ("local-only", "centralised-moma"):
        result = json.loads((out / "site-data-2sites/seed-0" / f"{name}.json").read_text())
        assert set(result["sites"]) == {"hospital-a", "hospital-b"}
        assert result["run_config"]["classes"] == "high,low"
        assert result["run_config"]["eval-source"] == ""  # the sites' task, not synthetic
        held_out = sum(s["num_examples"] for s in result["sites"].values())
        assert result["pooled"]["num_examples"] == held_out > 0  # the sites' validation splits
        assert result["kl_on"] is False


# -- a common start ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["same", "different"])
def test_local_and_centralised_arms_start_from_the_federated_round_1_student(tmp_path, task):
    args, sc = _tiny(tmp_path, task)
    assert sc.task == task
    fed = setup(sc, arm("fedavg-moma"), 0, tmp_path / "fed")
    arch = Architecture(fed.run.federation.student_model, fed.run.class_names,
                        fed.run.federation.image_size)
    fed_state, how = initial_student(fed.run, arch, package_teacher(sc.teacher))
    assert how.startswith("teacher")
    # the CE-only baseline is given the teacher too: it starts from the same weights
    ce = setup(sc, arm("fedavg-ce"), 0, tmp_path / "fed")
    assert ce.run.coordinator.teacher_path == str(sc.teacher)
    ce_state, _ = initial_student(ce.run, arch, package_teacher(ce.run.coordinator.teacher_path))
    for name in ("local-only", "centralised-moma"):
        s = setup(sc, arm(name), 0, tmp_path / name)
        model, _, digest = start_student(s.run, sc.teacher)
        state = wire_state(model.state_dict())
        assert set(state) == set(fed_state) == set(ce_state)
        for k in fed_state:
            assert torch.equal(state[k], fed_state[k]), k
            assert torch.equal(ce_state[k], fed_state[k]), k
        out = run_local(s, sc.teacher, pooled=name == "centralised-moma")  # trains for real
        assert out["init_digest"] == digest == state_digest(fed_state)
        assert not torch.equal(out["models"][0].state_dict()["conv_stem.weight"],
                               fed_state["conv_stem.weight"])  # and then it trained
        steps = out["steps_per_site"]
        assert list(steps) == (["centralised"] if name == "centralised-moma"
                               else ["site-0", "site-1", "site-2"])


def test_a_larger_teacher_is_trained_as_asked_and_every_arm_starts_from_one_random_student(
        tmp_path):
    args = benchmark.check_options(benchmark.parser().parse_args(
        ["accuracy", *TINY, "--tasks", "same", "--teacher-model", "resnet10t", "--teacher-n",
         "16", "--teacher-epochs", "1", "--out", str(tmp_path / "out")]))
    sc = benchmark.scenarios(args)[0]
    assert "resnet10t" in sc.teacher.name
    benchmark.ensure_teacher(args, sc)  # trains for real (16 images, one epoch)
    from moma_core.checkpoint import read_sidecar

    assert read_sidecar(sc.teacher)["architecture"]["model_name"] == "resnet10t"
    sc = benchmark.check_scenario(sc, args)
    assert sc.task == "same"
    fed = setup(sc, arm("fedavg-moma"), 0, tmp_path / "fed")
    arch = Architecture(fed.run.federation.student_model, fed.run.class_names,
                        fed.run.federation.image_size)
    assert arch.model_name == "test_efficientnet"
    fed_state, how = initial_student(fed.run, arch, package_teacher(sc.teacher))
    assert how.startswith("random (teacher resnet10t")
    ce = setup(sc, arm("fedavg-ce"), 0, tmp_path / "ce")
    ce_state, _ = initial_student(ce.run, arch, package_teacher(ce.run.coordinator.teacher_path))
    local = setup(sc, arm("local-only"), 0, tmp_path / "local")
    model, _, digest = start_student(local.run, sc.teacher)
    assert digest == state_digest(fed_state) == state_digest(ce_state)
    # MoMA follows a teacher of another architecture frozen; CRCKD's EMA teacher cannot
    assert fed.run.objective.teacher_update == local.run.objective.teacher_update == "frozen"
    assert "needs a teacher of the student's architecture" in arm("fedavg-crckd").not_applicable(
        sc, args.model)
    same_arch = replace(sc, teacher_model=args.model)
    assert arm("fedavg-crckd").not_applicable(same_arch, args.model) is None
    assert setup(same_arch, arm("fedavg-moma"), 0, tmp_path / "fed2"
                 ).run.objective.teacher_update == "momentum"


# -- end to end (Ray) -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "bench"
    script = Path(sys.executable).parent / "moma-bench"
    r = subprocess.run([str(script), "accuracy", "--quick", "--arms", "fedavg-moma",
                        "local-only", "--seeds", "0", "--tasks", "different", "--n", "64",
                        "--eval-n", "40", "--rounds", "2", "--teacher-n", "64",
                        "--teacher-epochs", "1", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("pooled accuracy") == 2  # one progress line per arm
    summary = json.loads((out / "summary.json").read_text())
    sc = summary["scenarios"]["different-task-3sites"]
    assert sc["task"] == "different" and sc["same_start"] is True
    assert set(sc["arms"]) == {"fedavg-moma", "local-only"}
    for name, agg in sc["arms"].items():
        assert agg["status"] == "ok" and agg["seeds"] == [0] and agg["kl_on"] is False
        for part in ("pooled", "site_mean"):
            for metric in ("accuracy", "macro_f1"):
                assert 0.0 <= agg[part][metric]["mean"] <= 1.0, (name, part, metric)
            assert -1.0 <= agg[part]["kappa"]["mean"] <= 1.0
        assert len(agg["sites"]) == 3
        nce = agg["rounds"]["train-nce"]
        assert len(nce) == 2 and all(v is not None and math.isfinite(v) and v >= 0 for v in nce)
        assert agg["rounds"]["train-kl"] == [0.0, 0.0]  # a different task: KL off
        assert agg["steps_per_site"] == sc["arms"]["local-only"]["steps_per_site"]
    fed = json.loads((out / "different-task-3sites/seed-0/fedavg-moma.json").read_text())
    results = json.loads((Path(fed["run_dir"]) / "results.json").read_text())
    local = json.loads((out / "different-task-3sites/seed-0/local-only.json").read_text())
    assert results["rounds"][0]["start_digest"] == local["init_digest"] == fed["init_digest"]
    md = (out / "summary.md").read_text()
    assert "| fedavg-moma | 1 |" in md and "| local-only | 1 |" in md
    assert (out / "plots" / "different-task-3sites-terms.png").is_file()


def test_private_arms_spend_their_target_epsilon_by_the_sites_own_accounting(tmp_path):
    """The ε arms: DP-SGD with dp-moma, and a noise multiplier with which a site's ledger
    (same sample rate, steps and δ as the site computes them) ends at or just under the
    target over the run; a smaller ε needs more noise."""
    from client.site_config import site_settings
    from client.site_training import site_data
    from moma_core.privacy.accounting import DPStep, default_delta, epsilon
    from moma_core.sources import make_loader

    args, sc = _tiny(tmp_path, "same")
    sigmas = {}
    for eps in (8.0, 3.0, 1.0):
        s = setup(sc, arm(f"dp-moma-eps{eps:g}"), 0, tmp_path / f"e{eps:g}")
        run = s.run
        assert run.privacy.dp == "dp-sgd" and run.objective.objective == "dp-moma"
        sigmas[eps] = run.privacy.dp_noise_multiplier
        for site in s.sites:  # what each site's dp_round will account
            data = site_data(site_settings(site), run.federation.image_size,
                             run.training.augment, run.class_names)
            batches = len(make_loader(data.train, run.training.batch_size, train=True))
            steps = [DPStep(sigmas[eps], 1.0 / batches, run.training.local_epochs * batches)
                     ] * run.federation.num_rounds
            spent = epsilon(steps, default_delta(len(data.train)), run.privacy.dp_accountant)
            assert spent <= eps * (1 + 1e-6)
        assert spent > eps * 0.9  # not far under it either (the noisiest site decides)
    assert sigmas[8.0] < sigmas[3.0] < sigmas[1.0]
    plain = setup(sc, arm("fedavg-dp-moma"), 0, tmp_path / "plain").run
    assert plain.privacy.dp == "off" and plain.objective.objective == "dp-moma"


def test_the_personalised_arm_fine_tunes_each_sites_own_copy_on_its_own_data(tmp_path):
    """``fedavg-moma-residual-ft``: each site gets its own copy of the global student,
    fine-tuned with CE on its own training split (its own seed), and the global is left as
    it was; the same call again gives the same models."""
    import copy

    from moma_bench.arms import Setup, personalise
    from moma_core.models import build_model
    from tests.helpers import synthetic_sites, tiny_run

    run = tiny_run(image_size=32)
    sites = synthetic_sites(tmp_path, 2, n=40)
    sites[1]["class-probs"] = "0.7,0.1,0.1,0.1"  # another label mix than site 0's
    torch.manual_seed(0)
    global_model = build_model(run.student_architecture())
    before = copy.deepcopy(global_model.state_dict())
    setup = Setup(None, run, sites, tmp_path)
    models = personalise([copy.deepcopy(global_model) for _ in sites], setup, epochs=1)
    again = personalise([copy.deepcopy(global_model) for _ in sites], setup, epochs=1)
    assert all(torch.equal(v, global_model.state_dict()[k]) for k, v in before.items())
    weights = [m.get_classifier().weight.detach() for m in models]
    assert not torch.equal(weights[0], before["classifier.weight"])
    assert not torch.allclose(weights[0], weights[1])  # each site its own data and seed
    for a, b in zip(models, again, strict=True):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
