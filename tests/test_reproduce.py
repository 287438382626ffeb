"""benchmarks/reproduce.py: which runs it launches, in which order, and when it stops launching."""

import json
import time

import pytest

from benchmarks.reproduce import _parse_stop_time, planned_command, run_order


def test_small_data_runs_paired_seeds_first_and_skips_seed_0():
    order = run_order("small-data")
    assert order[:4] == [("branchynet", 1), ("eed-mse", 1), ("branchynet", 2), ("eed-mse", 2)]
    first_kl = order.index(("eed-kl", 1))
    # 16 BranchyNet/EED-MSE pairs come before any EED-KL or baseline run.
    assert {m for m, _ in order[:first_kl]} == {"branchynet", "eed-mse"} and first_kl == 32
    assert all(seed != 0 for _, seed in order) and len(order) == len(set(order)) == 4 * 30


def test_methods_and_seeds_narrow_the_order():
    assert run_order("small-data", ["eed-mse", "branchynet"], [5, 6]) == [
        ("branchynet", 5),
        ("eed-mse", 5),
        ("branchynet", 6),
        ("eed-mse", 6),
    ]
    assert run_order("cpu", ["baseline", "eed-kl"]) == [
        ("baseline", 0),
        ("eed-kl", 0),
        ("baseline", 1),
        ("eed-kl", 1),
        ("baseline", 2),
        ("eed-kl", 2),
    ]
    assert run_order("small-data", ["kd"], [3]) == [("kd", 3)]  # a method no phase names still runs


def test_stop_time_is_today_unless_long_past():
    now = time.time()
    in_a_minute = time.strftime("%H:%M", time.gmtime(now + 120))
    assert 0 < _parse_stop_time(in_a_minute) - now <= 180
    a_minute_ago = time.strftime("%H:%M", time.gmtime(now - 120))
    assert _parse_stop_time(a_minute_ago) <= now  # just past: stop now, not tomorrow
    # More than 12 h ahead is tonight, not last night (at 08:57, "21:57" launched nothing).
    fixed = 1_800_000_000.0  # a known instant
    thirteen_hours = time.strftime("%H:%M", time.gmtime(fixed + 13 * 3600))
    assert _parse_stop_time(thirteen_hours, now=fixed) - fixed == pytest.approx(13 * 3600, abs=60)
    two_hours_ago = time.strftime("%H:%M", time.gmtime(fixed - 2 * 3600))
    assert _parse_stop_time(two_hours_ago, now=fixed) - fixed == pytest.approx(22 * 3600, abs=60)


def test_report_covers_every_finished_run_not_just_the_narrowed_ones(tmp_path, capsys):
    # A run narrowed to some methods (here --methods eed-kl) must not replace the full report.
    import json

    from test_paired_stats import _fake_run

    from benchmarks.reproduce import main

    runs_dir, out_dir = tmp_path / "runs", tmp_path / "out"
    for seed in (1, 2):
        _fake_run(runs_dir, "branchynet", seed, [80, 85], 86, 99, 85, 86)
        _fake_run(runs_dir, "eed-mse", seed, [81, 86 + seed], 88, 98, 86, 87.5)
        _fake_run(runs_dir, "eed-kl", seed, [81, 85 + seed], 87, 98, 86, 87.0)
    argv = ["--preset", "small-data", "--report-only", "--methods", "eed-kl", "--seeds", "1", "2"]
    assert main([*argv, "--runs-dir", str(runs_dir), "--out-dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "reproduce_small-data.json").read_text())
    assert report["meta"]["runs_per_method"] == {"branchynet": 2, "eed-mse": 2, "eed-kl": 2}
    assert "**eed-kl − branchynet** (2 pairs)" in (out_dir / "reproduce_small-data.md").read_text()


def _parsed(cmd):
    from training.options import explicit_flags, get_args_parser, resolve_args

    parser = get_args_parser()
    return resolve_args(parser.parse_args(cmd[2:]), explicit_flags(parser, cmd[2:]))


def test_extra_flags_win_and_flags_a_method_refuses_are_dropped(tmp_path):
    extra = ["--beta", "0.5", "--alpha", "0.3", "--teacher-exits", "1", "4"]
    # --extra comes last: the β default no longer overrides it (it did: "--beta 0.5 ... --beta 1").
    eed = _parsed(planned_command("eed-kl", 1, "cpu", tmp_path, extra, 1))
    assert (eed.beta, eed.alpha, eed.teacher_exits) == (0.5, 0.3, [1, 4])
    # train.py refuses --beta for kd and every distillation flag for the baseline and BranchyNet: those
    # runs failed; they now train without the flags they have no use for.
    kd = planned_command("kd", 1, "cpu", tmp_path, extra, 1)
    assert "--beta" not in kd and "--teacher-exits" not in kd and _parsed(kd).alpha == 0.3
    for name in ("baseline", "branchynet"):
        cmd = planned_command(name, 1, "cpu", tmp_path, extra, 1)
        assert not {"--alpha", "--beta", "--temperature", "--distill", "--teacher-exits"} & set(cmd)
        _parsed(cmd)  # accepted
    # the preset's temperature is the KL term's: an MSE run is planned without it (train.py refuses it)
    mse = planned_command("eed-mse", 1, "cpu", tmp_path, [], 1)
    assert "--temperature" not in mse and _parsed(mse).distill == "mse"


def test_the_cpu_report_pairs_differences_by_seed_and_states_the_weights(tmp_path):
    from test_paired_stats import _fake_run

    from benchmarks.reproduce import main

    runs_dir, out_dir = tmp_path / "runs", tmp_path / "out"
    eed = {0: 90.0, 1: 95.0, 2: 91.0}
    other = {0: 89.0, 2: 92.0}  # seed 1 did not finish: positions would pair eed s1 with branchynet s2
    for seed, acc in eed.items():
        _fake_run(runs_dir, "eed-kl", seed, [80, acc], 90, 99, 85, 86, preset="cpu")
    for seed, acc in other.items():
        _fake_run(runs_dir, "branchynet", seed, [80, acc], 90, 99, 85, 86, preset="cpu")
    argv = ["--preset", "cpu", "--report-only", "--runs-dir", str(runs_dir), "--out-dir", str(out_dir)]
    assert main(argv) == 0
    md = (out_dir / "reproduce_cpu.md").read_text()
    # Seeds 0 and 2: differences +1 and -1, mean 0 (by position: 90-89, 95-92: mean +2).
    assert "eed-kl − branchynet, main output: +0.00 points" in md and "(2 seeds)" in md, md
    assert "Distillation settings of the runs: eed-kl kl α 1 β 1 T 3." in md, md  # the cpu preset's α = 1
    saved = json.loads((out_dir / "reproduce_cpu.json").read_text())["methods"]["branchynet"]
    assert saved["seed_ids"] == [0, 2]


def test_runs_of_another_preset_are_not_reported_as_this_one(tmp_path, capsys):
    from test_paired_stats import _fake_run

    from benchmarks.reproduce import main

    runs_dir = tmp_path / "runs"
    for seed in (1, 2):
        _fake_run(runs_dir, "branchynet", seed, [80, 85], 86, 99, 85, 86, preset="cpu")
    argv = ["--preset", "small-data", "--report-only", "--runs-dir", str(runs_dir), "--out-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "--epochs 200 (the run: 10)" in err, err
    assert not (tmp_path / "o" / "reproduce_small-data.md").exists()


@pytest.mark.parametrize(
    "edit, named",
    [({"lr": 0.05}, "--lr 0.1 (the run: 0.05)"), ({"weight_decay": 0.0}, "--weight-decay 0.0005 (the run: 0.0)")],
)
def test_a_run_trained_with_a_setting_the_preset_leaves_at_its_default_is_not_reported_as_the_presets(
    tmp_path, capsys, edit, named
):
    # Only the flags the preset's command types were compared: a run of --extra --lr 0.05 passed as
    # one of the preset's, and a later run without --extra skipped and reported it.
    from test_paired_stats import _fake_run

    from benchmarks.reproduce import main

    runs_dir = tmp_path / "runs"
    run = _fake_run(runs_dir, "eed-mse", 1, [80, 85], 86, 99, 85, 86)
    record = json.loads((run / "config.json").read_text())
    record["config"].update(edit)
    (run / "config.json").write_text(json.dumps(record))
    argv = ["--preset", "small-data", "--report-only", "--runs-dir", str(runs_dir), "--out-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and named in err, err


def test_extra_flags_train_py_refuses_are_an_error_line_and_eval_every_counts_only_where_typed(tmp_path, capsys):
    from test_paired_stats import _fake_run

    from benchmarks.reproduce import check_settings, main

    runs_dir = tmp_path / "runs"
    run = _fake_run(runs_dir, "branchynet", 1, [80, 85], 86, 99, 85, 86, preset="cpu")
    argv = ["--preset", "cpu", "--report-only", "--runs-dir", str(runs_dir), "--out-dir", str(tmp_path / "o")]
    assert main([*argv, "--extra", "--epochs", "0"]) == 2  # was a UsageError traceback
    err = capsys.readouterr().err
    assert "refused by train.py: --epochs must be at least 1" in err and "Traceback" not in err, err
    # A run resumed with another --eval-every (train.py allows it) is still the preset's run ...
    record = json.loads((run / "config.json").read_text())
    record["config"]["eval_every"] = 5
    (run / "config.json").write_text(json.dumps(record))
    check_settings(run, planned_command("branchynet", 1, "cpu", runs_dir, [], 1))
    # ... unless the preset sets it.
    small = _fake_run(tmp_path / "small", "branchynet", 1, [80, 85], 86, 99, 85, 86)
    record = json.loads((small / "config.json").read_text())
    record["config"]["eval_every"] = 5
    (small / "config.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="--eval-every 20 \\(the run: 5\\)"):
        check_settings(small, planned_command("branchynet", 1, "small-data", tmp_path / "small", [], 1))


def test_settings_a_method_does_not_use_are_not_compared(tmp_path):
    # A baseline's α weights a term it does not have: runs from before α's default changed still count.
    from test_paired_stats import _fake_run

    from benchmarks.reproduce import check_settings

    run = _fake_run(tmp_path, "baseline", 1, [84], None, 99, 84, None)
    record = json.loads((run / "config.json").read_text())
    record["config"].update(alpha=1.0, temperature=4.0)
    (run / "config.json").write_text(json.dumps(record))
    check_settings(run, planned_command("baseline", 1, "small-data", tmp_path, [], 1))


def test_a_failed_run_stops_the_launching_of_the_rest(tmp_path, capsys):
    """Real train.py runs that fail at once (an --extra flag it refuses): the first failure stops the
    benchmark instead of launching every other run first."""
    from benchmarks.reproduce import main

    runs_dir = tmp_path / "runs"
    argv = ["--preset", "smoke", "--methods", "eed-kl", "--seeds", "1", "2", "3", "--jobs", "1"]
    assert main([*argv, "--runs-dir", str(runs_dir), "--out-dir", str(tmp_path / "o"), "--extra", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "failed (exit 2)" in err and "--lr must be a positive finite number" in err, err
    assert [p.name for p in runs_dir.glob("*.log")] == ["eed-kl-s1.log"]  # seeds 2 and 3 never started
