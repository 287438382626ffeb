"""CPUs the server may use: a container's CPU quota caps the cores it sees (decode slots follow it)."""

from __future__ import annotations

import os

from serving.cpus import cgroup_cpu_limit, usable_cpus


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_a_cgroup_v2_quota_caps_the_cpus_rounded_up(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # kubernetes limits.cpu: 1500m
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(_cores(), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no limit: the affinity's cores
    assert cgroup_cpu_limit(tmp_path) is None and usable_cpus(tmp_path) == _cores()


def test_a_cgroup_v1_quota_is_read_when_there_is_no_v2_file(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5 and usable_cpus(tmp_path) == 1  # never below one
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_or_unreadable_ones_mean_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "absent") is None
    (tmp_path / "cpu.max").write_text("garbage")
    assert cgroup_cpu_limit(tmp_path) is None and usable_cpus(tmp_path) == _cores()
