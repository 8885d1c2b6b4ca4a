"""The CPU count every thread count follows: cgroup v2 and v1 quotas as real files in the layouts nodes write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leanserve_serving.cpus import cpu_limit, quota_cpus


def v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def v1(root: Path, quota: int, period: int = 100_000, folder: str = "cpu") -> Path:
    cpu = root / folder
    cpu.mkdir(parents=True, exist_ok=True)
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("400000 100000", 4), ("100000 100000", 1)],
)
def test_v2_quota_rounds_up_to_whole_cpus(tmp_path, cpu_max, expected):
    assert cpu_limit(v2(tmp_path, cpu_max), affinity=16) == expected


def test_v2_unlimited_is_the_affinity_count(tmp_path):
    assert quota_cpus(v2(tmp_path, "max 100000")) is None
    assert cpu_limit(tmp_path, affinity=6) == 6


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [(200_000, 100_000, 2), (250_000, 100_000, 3), (25_000, 50_000, 1), (75_000, 25_000, 3)],
)
def test_v1_quota_is_read_from_either_cpu_folder(tmp_path, folder, quota, period, expected):
    root = v1(tmp_path, quota, period, folder)
    assert quota_cpus(root) == pytest.approx(quota / period)
    assert cpu_limit(root, affinity=16) == expected


def test_v1_quota_of_minus_one_is_unlimited(tmp_path):
    root = v1(tmp_path, -1)
    assert quota_cpus(root) is None
    assert cpu_limit(root, affinity=5) == 5


def test_a_quota_above_the_affinity_count_is_capped(tmp_path):
    assert cpu_limit(v2(tmp_path / "v2", "800000 100000"), affinity=3) == 3
    assert cpu_limit(v1(tmp_path / "v1", 800_000), affinity=3) == 3


def test_a_tiny_quota_still_gets_one_cpu(tmp_path):
    assert cpu_limit(v2(tmp_path / "v2", "1000 100000"), affinity=8) == 1
    assert cpu_limit(v1(tmp_path / "v1", 1000), affinity=8) == 1


def test_v2_file_wins_over_v1_folders(tmp_path):
    root = v1(v2(tmp_path, "300000 100000"), 100_000)
    assert cpu_limit(root, affinity=16) == 3


def test_v2_max_does_not_fall_back_to_a_stray_v1_quota(tmp_path):
    root = v1(v2(tmp_path, "max 100000"), 100_000)
    assert cpu_limit(root, affinity=7) == 7


def test_no_cgroup_files_means_the_affinity_count(tmp_path):
    assert quota_cpus(tmp_path) is None
    assert cpu_limit(tmp_path, affinity=4) == 4
    assert cpu_limit(tmp_path) == len(os.sched_getaffinity(0))


def test_unreadable_quota_files_fall_back_to_the_affinity_count(tmp_path):
    assert cpu_limit(v2(tmp_path / "v2", "garbage"), affinity=4) == 4
    root = tmp_path / "v1"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")  # the period is missing
    assert cpu_limit(root, affinity=4) == 4


def test_this_machine_answers_within_its_affinity():
    assert 1 <= cpu_limit() <= len(os.sched_getaffinity(0))
