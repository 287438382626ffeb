"""benchmarks/reproduce.py: which runs it launches, in which order, and when it stops launching."""

import time

from benchmarks.reproduce import _parse_stop_time, run_order


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
