"""Cascade accounting, threshold calibration, disagreement, and the evaluation CLI."""

import json

import numpy as np
import pytest
import torch
from datagen import make_fashion_mnist

from serving import cascade as serving_cascade
from training import cascade
from training.accuracy import topk_accuracy
from training.evaluate import analyze, disagreement, main
from training.flops import exit_costs
from training.models import create_model
from training.train import cli as train_cli


@pytest.fixture(scope="module")
def model_logits():
    """A real resnet18's per-exit logits on noise, with its measured exit costs."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, 0.125).eval()
    with torch.no_grad():
        logits = torch.stack(model(torch.randn(64, 1, 28, 28)).logits, 1).numpy()
    return logits, exit_costs(model, (1, 28, 28))


def test_threshold_zero_costs_exactly_exit_one(model_logits):
    logits, costs = model_logits
    out = cascade.run_cascade(logits, 0.0, [c.stage_gflops for c in costs])
    assert (out.exit == 1).all()
    assert (out.prediction == logits[:, 0].argmax(1)).all()
    assert out.mean_gflops() == costs[0].gflops  # exit 1's full path, not an approximation


@pytest.mark.parametrize("threshold", [1.0 + 1e-9, 1.5, cascade.NEVER])
def test_threshold_above_one_runs_the_whole_chain_and_answers_with_main(model_logits, threshold):
    logits, costs = model_logits
    stage = [c.stage_gflops for c in costs]
    out = cascade.run_cascade(logits, threshold, stage)
    assert (out.exit == len(costs)).all()
    assert (out.prediction == logits[:, -1].argmax(1)).all()
    # Every stage graph ran once: the trunk once plus every head, which is more than the main path alone.
    assert out.mean_gflops() == pytest.approx(sum(stage))
    assert out.mean_gflops() == pytest.approx(costs[-1].gflops + sum(c.head_gflops for c in costs[:-1]))


def test_saturated_softmax_stops_at_threshold_one():
    logits = np.zeros((1, 3, 4))
    logits[0, :, 2] = 1000.0  # softmax top probability is exactly 1.0
    assert cascade.run_cascade(logits, 1.0, [1, 1, 1]).exit.tolist() == [1]
    assert cascade.run_cascade(logits, 1.0 + 1e-12, [1, 1, 1]).exit.tolist() == [3]
    # 1 means "only a saturated softmax": the tie slack applies below 1 (it stopped 1.5 % of the
    # shipped model's test images at an early exit under confidence=1)
    conf = np.array([[1 - 1e-7, 1 - 1e-7, 0.5]])
    assert cascade.exits_taken(conf, [1.0, 1.0]).tolist() == [3]
    assert not serving_cascade.stops_at(1 - 1e-7, np.array([1.0, 1.0]), 1)


def test_per_exit_thresholds_and_accounting():
    # top probabilities per sample and exit (via logits with a known softmax), 3 exits
    conf = np.array([[0.9, 0.5, 0.2], [0.3, 0.8, 0.1], [0.3, 0.4, 0.6], [0.95, 0.99, 0.99]])
    assert cascade.exits_taken(conf, [0.85, 0.75]).tolist() == [1, 2, 3, 1]
    assert cascade.exits_taken(conf, [1.0, 0.45]).tolist() == [2, 2, 3, 2]
    with pytest.raises(ValueError, match="one threshold per early exit"):
        cascade.exits_taken(conf, [0.5, 0.5, 0.5])
    assert cascade.cumulative_gflops([0.2, 0.1, 0.3]).tolist() == pytest.approx([0.2, 0.3, 0.6])


def test_quantile_thresholds_split_samples_as_asked():
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=(1000, 4))
    shares = cascade.geometric_exit_distribution(0.5, 4)
    assert shares.sum() == pytest.approx(1) and shares[0] > shares[1] > shares[2] > shares[3]
    taken = cascade.exits_taken(conf, cascade.fit_quantile_thresholds(conf, shares))
    got = np.bincount(taken, minlength=5)[1:] / 1000
    assert got == pytest.approx(shares, abs=0.003)


def test_quantile_thresholds_count_survivors_by_the_served_rule():
    # A score one ulp below the first exit's threshold stops there when served (the tie slack): the
    # fit must count it as stopped too, or later thresholds are fitted on samples that never reach them.
    conf = np.array([[0.9, 0.5, 1], [np.nextafter(0.9, 0), 0.99, 1], [0.2, 0.6, 1], [0.1, 0.5, 1]])
    thresholds = cascade.fit_quantile_thresholds(conf, [0.25, 0.25, 0.5])
    assert thresholds.tolist() == [0.9, 0.6]  # exit 2's from the samples that reach it (not 0.99)
    assert cascade.exits_taken(conf, thresholds).tolist() == [1, 1, 2, 3]


def _separable(n, k=3, c=5, seed=0):
    """Logits where deeper exits are more accurate and confidence tracks correctness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, k, c))
    for i in range(k):
        right = rng.uniform(size=n) < 0.5 + 0.2 * i
        logits[right, i, labels[right]] += 3.0
    return logits, labels


def test_calibration_meets_targets_on_validation_only():
    stage = [1.0, 0.5, 0.5]
    val_logits, val_labels = _separable(800, seed=1)
    test_logits, test_labels = _separable(800, seed=2)
    cals = cascade.calibrate(
        val_logits,
        val_labels,
        stage,
        budgets_gflops=[1.4, 0.5],
        target_accuracies=[0.8, 0.999],
        eval_splits={"test": (test_logits, test_labels)},
    )
    budget, impossible_budget, acc, impossible_acc = cals
    val_point = cascade.score(val_logits, val_labels, budget.chosen.thresholds, stage)
    assert val_point.mean_gflops <= 1.4 and budget.chosen.mean_gflops == pytest.approx(val_point.mean_gflops)
    assert budget.evaluated["test"]["mean_gflops"] == pytest.approx(
        cascade.score(test_logits, test_labels, budget.chosen.thresholds, stage).mean_gflops
    )
    assert impossible_budget.chosen is None and "below the cheapest" in impossible_budget.reason
    assert acc.chosen.accuracy >= 0.8 and impossible_acc.chosen is None and "not reached" in impossible_acc.reason
    # The choice depends on validation alone: other evaluation data changes nothing.
    again = cascade.calibrate(val_logits, val_labels, stage, [1.4], [0.8], {"test": _separable(50, seed=9)})
    assert [c.chosen.thresholds for c in again] == [budget.chosen.thresholds, acc.chosen.thresholds]
    # Per-exit (MSDNet) policies are among the candidates and never worse than the best shared one.
    cands = cascade.candidate_policies(val_logits, val_labels, stage)
    shared = max(p.accuracy for p in cands if p.family == "shared" and p.mean_gflops <= 1.4)
    assert budget.chosen.accuracy >= shared and {p.family for p in cands} == {"shared", "geometric"}


def test_the_msdnet_curve_of_an_evaluated_split_is_fitted_on_validation_only():
    """The per-exit (MSDNet) thresholds are fitted from confidence quantiles: fitted on the split they
    are drawn on, the curve beside the calibrated policies was test-fitted and optimistic."""
    from training.evaluate import _cascade_section

    stage = [1.0, 0.5, 0.5]
    val_logits, val_labels = _separable(800, seed=1)
    test_logits, test_labels = _separable(800, seed=2)
    args = (stage, "test", None, 2.0, [], [], [], [])
    section = _cascade_section(test_logits, test_labels, *args)
    assert "geometric_curve" not in section and section["calibration"]["split"] is None
    with_val = (stage, "test", (val_logits, val_labels), 2.0, [], [], [], [])
    section = _cascade_section(test_logits, test_labels, *with_val)
    assert section["geometric_fitted_on"] == "val" and section["geometric_curve"]
    for point in section["geometric_curve"]:
        shares = cascade.geometric_exit_distribution(point["parameter"], 3)
        fitted = cascade.fit_quantile_thresholds(cascade.confidences(val_logits).conf, shares)
        assert point["thresholds"] == pytest.approx(list(fitted))  # from validation, drawn on test
    test_fitted = cascade.geometric_family(test_logits, test_labels, stage)
    assert [p["thresholds"] for p in section["geometric_curve"]] != [p.thresholds for p in test_fitted]


def test_disagreement_and_topk():
    labels = np.array([0, 1, 2, 3])
    # exit 1 predicts [0, 0, 2, 0]; main predicts [0, 1, 0, 0]
    logits = np.zeros((4, 2, 4))
    for n, (a, b) in enumerate([(0, 0), (0, 1), (2, 0), (0, 0)]):
        logits[n, 0, a] = logits[n, 1, b] = 5
    d = disagreement(logits, labels)
    vs = d["vs_main"][0]
    assert (vs["both_right"], vs["exit_right_main_wrong"], vs["exit_wrong_main_right"], vs["both_wrong"]) == (
        0.25,
        0.25,
        0.25,
        0.25,
    )
    assert vs["predictions_differ"] == 0.5
    assert d["right_wrong"] == [[0.0, 0.25], [0.25, 0.0]]
    assert topk_accuracy(logits[:, 0], labels, 1) == 0.5
    assert topk_accuracy(logits[:, 0], labels, 4) == 1.0


def test_analyze_reports_top5_with_many_classes():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 2, 100)), rng.integers(0, 100, 50)
    costs = [
        {"exit": 1, "gflops": 1.0, "params": 1, "stage_gflops": 1.0, "head_gflops": 0.2},
        {"exit": 2, "gflops": 1.5, "params": 2, "stage_gflops": 0.6, "head_gflops": 0.1},
    ]
    res = analyze(logits, labels, costs, "test")  # no validation split: nothing calibrated
    assert "top5_accuracy" in res["exits"][0] and "top5_accuracy" in res["ensemble"]
    assert res["ensemble"]["gflops"] == pytest.approx(1.6)
    assert res["cascade"]["calibration"]["policies"] == [] and "validation" in res["cascade"]["calibration"]["reason"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = make_fashion_mnist(root / "data", n_train=160, n_test=64)
    args = [
        "--arch",
        "resnet18",
        "--dataset",
        "fashion-mnist",
        "--width-mult",
        "0.125",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--val-split",
        "32",
        "--data-dir",
        str(data),
        "--no-download",
        "--no-progress",
        "--threads",
        "1",
        "--output-dir",
        str(root),
        "--run-name",
        "r",
    ]
    assert train_cli(args) == 0
    return root / "r", data


def test_cli_writes_results_and_plots(tiny_run, capsys):
    run, data = tiny_run
    out = run / "eval"
    assert main([str(run / "checkpoint.pt"), "--out", str(out), "--data-dir", str(data), "--no-download"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["split"] == "test" and res["images"] == 64 and res["epoch"] == 2 and len(res["exits"]) == 4
    assert {"accuracy", "gflops", "params", "stage_gflops", "cascade_gflops"} <= set(res["exits"][0])
    assert {"ensemble", "disagreement", "cascade"} <= set(res)
    cal = res["cascade"]["calibration"]
    assert cal["split"] == "val" and cal["images"] == 32
    assert [p["name"] for p in cal["policies"]] == [
        "budget_0.5x_main",
        "budget_0.75x_main",
        "accuracy_main_minus_0.5pt",
        "accuracy_main_minus_1pt",
    ]
    for name in ("accuracy_vs_gflops", "training_curves", "disagreement"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "exit" in capsys.readouterr().out
    # --split val evaluates on the validation split (and says so)
    assert main([str(run), "--split", "val", "--out", str(out / "val"), "--data-dir", str(data)]) == 0
    assert json.loads((out / "val" / "results.json").read_text())["images"] == 32


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size: 0 is below 1"),  # was a ZeroDivisionError
        (["--subset", "-5"], "--subset: -5 is below 1"),  # evaluated all but the last 5 images
        (["--device", "bogus"], "not a device this code runs on"),  # a RuntimeError traceback
        (["--device", "mps"], "not a device this code runs on"),
        (["--out", "{file}"], "is a file; give a folder"),  # a FileExistsError after the whole evaluation
        (["--out", "{file}/eval"], "cannot be created"),  # an OSError traceback after the whole evaluation
        (["--out", "{dir}/results.json"], "names a file"),  # made a folder called results.json
    ],
)
def test_cli_refuses_bad_flags_with_a_message(tiny_run, tmp_path, capsys, flags, message):
    run, data = tiny_run
    (tmp_path / "a-file").write_text("x")
    flags = [f.replace("{file}", str(tmp_path / "a-file")).replace("{dir}", str(tmp_path)) for f in flags]
    try:
        rc = main([str(run), "--data-dir", str(data), "--no-download", *flags])
    except SystemExit as exc:  # argparse's own refusal
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_cli_clear_errors(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    payload["dataset"]["classes"] = [f"x{i}" for i in range(10)]
    torch.save(payload, tmp_path / "renamed.pt")
    assert main([str(tmp_path / "renamed.pt"), "--data-dir", str(data)]) == 2
    assert "class names differ" in capsys.readouterr().err
    payload["dataset"]["name"] = "cifar10"  # a data set that is not on disk, downloading off
    torch.save(payload, tmp_path / "cifar.pt")
    assert main([str(tmp_path / "cifar.pt"), "--data-dir", str(tmp_path / "empty"), "--no-download"]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert not (tmp_path / "eval-test").exists()  # the default --out beside the checkpoint: not left empty
    assert main([str(run), "--budget-fractions", "0", "--out", str(tmp_path / "new" / "eval")]) == 2
    assert "--budget-fractions 0" in capsys.readouterr().err and not (tmp_path / "new").exists()
    shared = tmp_path / "shared"  # made by this evaluation, written into by another meanwhile: kept
    (shared / "other").mkdir(parents=True)
    (shared / "other" / "results.json").write_text("{}")
    assert (
        main([str(tmp_path / "cifar.pt"), "--out", str(shared / "mine"), "--data-dir", str(tmp_path), "--no-download"])
        == 2
    )
    assert (shared / "other" / "results.json").is_file() and not (shared / "mine").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main([str(tmp_path / "cifar.pt"), "--out", str(kept), "--data-dir", str(tmp_path), "--no-download"]) == 2
    assert kept.is_dir()  # a folder that was there stays
    capsys.readouterr()
    # A checkpoint of an architecture this code lacks, or without its model's description: said, not a traceback.
    good = torch.load(run / "checkpoint.pt", weights_only=False)
    for name, edit in (("foo", {"arch": "foo"}), ("none", None)):
        bad = dict(good)
        if edit is None:
            del bad["model_config"]
        else:
            bad["model_config"] = {**good["model_config"], **edit}
        torch.save(bad, tmp_path / f"{name}.pt")
        assert main([str(tmp_path / f"{name}.pt"), "--data-dir", str(data), "--no-download"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("architecture this code does not have" in err or "no model_config" in err), (
            err
        )
    # Data too small for the 32 images the run held out: train.py's flag was named, in a traceback.
    small = make_fashion_mnist(tmp_path / "small", n_train=20, n_test=16)
    assert main([str(run), "--data-dir", str(small), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "cannot be split as this run's was at training time" in err and "Traceback" not in err, err
