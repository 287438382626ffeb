"""The interval code of the paper-comparison report, on fixed numbers checked by hand."""

import math

import pytest

from benchmarks.paired_stats import betainc, mean_interval, paired_interval, t_cdf, t_quantile


@pytest.mark.parametrize(
    "df, expected",  # two-sided 95 % critical values from a printed t table
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (13, 2.160), (19, 2.093), (29, 2.045), (120, 1.980)],
)
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)


def test_t_distribution_known_values():
    assert t_cdf(0.0, 7) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/π
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 1 / math.sqrt(6) * 1)  # df 2: 1/2 + t / (2√(2 + t²))
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)  # tends to the normal
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248)  # 1 − Σ_{j<2} C(4, j) 0.4^j 0.6^(4−j)


def test_mean_interval_by_hand():
    # mean 2.5, s = 1.2910, s/√4 = 0.6455, t(0.975, 3) = 3.1824 → half width 2.0542
    iv = mean_interval([1, 2, 3, 4])
    assert (iv.n, iv.mean, iv.std) == (4, 2.5, pytest.approx(1.2910, abs=1e-4))
    assert (iv.low, iv.high) == (pytest.approx(0.4458, abs=1e-3), pytest.approx(4.5542, abs=1e-3))
    assert iv.excludes_zero
    single = mean_interval([0.7])
    assert (single.low, single.high, single.std) == (0.7, 0.7, 0.0) and "no interval" in str(single)
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


@pytest.mark.parametrize("confidence", [0.0, -0.5, 1.0, 1.5, float("nan")])
def test_a_confidence_outside_0_1_is_refused(confidence):
    # -0.5 gave an inverted interval that "excluded zero".
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0, 3.0], confidence)
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])


def test_paired_interval_pairs_by_seed_and_ignores_unpaired_seeds():
    eed = {1: 10.0, 2: 12.0, 3: 11.0}
    branchy = {1: 9.0, 2: 10.0, 3: 11.0, 4: 5.0}  # seed 4 has no partner
    iv = paired_interval(eed, branchy)
    # differences 1, 2, 0: mean 1, s 1, half width 4.3027 / √3 = 2.4842
    assert iv.n == 3 and iv.mean == pytest.approx(1.0)
    assert (iv.low, iv.high) == (pytest.approx(-1.4842, abs=1e-3), pytest.approx(3.4842, abs=1e-3))
    assert not iv.excludes_zero
    with pytest.raises(ValueError, match="share no seed"):
        paired_interval({1: 1.0}, {2: 1.0})


def _fake_run(root, method, seed, test, ensemble, train_main, val_main, val_ensemble, preset="small-data"):
    """A run folder as train.py writes it (only the keys the report reads), its config.json what
    ``preset``'s command for it gives (benchmarks/reproduce.py checks that)."""
    import json

    from benchmarks.reproduce import planned_command
    from training.options import explicit_flags, get_args_parser, resolve_args

    k = len(test)
    run = root / f"{method}-s{seed}"
    run.mkdir(parents=True)
    parser, argv = get_args_parser(), planned_command(method, seed, preset, root, [], 1)[2:]
    config = vars(resolve_args(parser.parse_args(argv), explicit_flags(parser, argv)))  # as train.py saves it
    (run / "config.json").write_text(json.dumps({"config": config}))
    final = {f"test_acc_exit{e + 1}": a / 100 for e, a in enumerate(test)}
    if ensemble is not None:
        final["test_acc_ensemble"] = ensemble / 100
    costs = [{"gflops": 0.01 * (e + 1)} for e in range(k)]
    (run / "final.json").write_text(json.dumps({"final_epoch": {"epoch": 2, **final}, "exit_costs": costs}))
    last = {"epoch": 2, f"train_acc_exit{k}": train_main / 100, f"val_acc_exit{k}": val_main / 100, "train_seconds": 1}
    if val_ensemble is not None:
        last["val_acc_ensemble"] = val_ensemble / 100
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "train_seconds": 1}) + "\n" + json.dumps(last) + "\n")
    return run


def test_report_pairs_seeds_per_exit_and_states_the_premises(tmp_path):
    from benchmarks.paired_report import summarize, to_markdown

    runs = {
        "branchynet": [_fake_run(tmp_path, "branchynet", s, [80, 85 + s], 86, 99, 85, 86) for s in (1, 2, 3)],
        "eed-mse": [
            _fake_run(tmp_path, "eed-mse", s, [81, 86 + s + d], 88, 98, 86, 87.5)
            for s, d in ((1, 0.0), (2, 1.0), (3, 2.0))
        ],
        "baseline": [_fake_run(tmp_path, "baseline", s, [84 + s], None, 99.5, 84, None) for s in (1, 2)],
    }
    summary = summarize(runs)
    eed = next(c for c in summary["comparisons"] if (c["a"], c["b"]) == ("eed-mse", "branchynet"))
    main = eed["by_exit"]["main"]  # differences 1, 2, 3: mean 2, s 1, t(0.975, 2) 4.3027 → ±2.4842
    assert eed["pairs"] == 3 and main["mean"] == pytest.approx(2.0) and main["wins"] == 3
    assert (main["low"], main["high"]) == (pytest.approx(-0.4842, abs=1e-3), pytest.approx(4.4842, abs=1e-3))
    assert eed["by_exit"]["exit 1"]["mean"] == pytest.approx(1.0) and eed["by_exit"]["exit 1"]["std"] == 0
    # The baseline has one output: compared with BranchyNet's main output, on the 2 shared seeds.
    base = next(c for c in summary["comparisons"] if (c["a"], c["b"]) == ("branchynet", "baseline"))
    assert (
        base["pairs"] == 2
        and list(base["by_exit"]) == ["main"]
        and base["by_exit"]["main"]["mean"] == pytest.approx(1.0)
    )
    bn = summary["methods"]["branchynet"]
    assert bn["ensemble_minus_main_val"]["mean"] == pytest.approx(1.0)
    assert bn["train_minus_test_main"]["mean"] == pytest.approx(99 - 87)
    assert [(p["method"], p["seed"]) for p in summary["pilot"]] == [
        ("branchynet", 1),
        ("eed-mse", 1),
        ("branchynet", 2),
        ("eed-mse", 2),
    ]
    md = to_markdown(summary, {"preset": "t", "regime": "r", "command": "c", "git_revision": "g", "machine": "m"})
    assert "**eed-mse − branchynet** (3 pairs)" in md and "+2.00 [-0.48, +4.48]" in md
