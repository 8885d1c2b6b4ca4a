"""``leanserve validate``: every invalid spec fails with the field named; valid ones pass.

These run the installed console script in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.invalid_specs import INVALID_CASES


def leanserve(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("leanserve", path=str(Path(sys.executable).parent))
    assert exe, "the leanserve console script is not installed in this environment"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_enough_invalid_cases_are_covered():
    assert len(INVALID_CASES) >= 10
    assert len({c.id for c in INVALID_CASES}) == len(INVALID_CASES)


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.id for c in INVALID_CASES])
def test_invalid_spec_is_rejected_naming_the_field(case, minimal_doc, tmp_path):
    path = tmp_path / f"{case.id}.yaml"
    path.write_text(yaml.safe_dump(case.apply(minimal_doc)))
    result = leanserve("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    error_lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert any(line.startswith(f"{case.path}: ") for line in error_lines), result.stdout
    assert case.reason in result.stdout, result.stdout


def test_valid_examples_pass():
    result = leanserve("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": valid") == len(EXAMPLES)


def test_json_output_lists_path_value_and_reason(minimal_doc, tmp_path):
    minimal_doc["spec"]["traffic"]["peakRps"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal_doc))
    result = leanserve("validate", "-o", "json", str(path))
    assert result.returncode == 1
    [doc] = json.loads(result.stdout)
    assert doc["valid"] is False
    assert doc["errors"] == [
        {"path": "spec.traffic.peakRps", "value": 10, "reason": "peakRps must be greater than or equal to averageRps"}
    ]


def test_multi_document_file_reports_each_document(minimal_doc, tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(minimal_doc))
    bad["metadata"]["name"] = "second"
    bad["spec"]["precision"] = "int4"
    other = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}}
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump_all([minimal_doc, bad, other]))
    result = leanserve("validate", str(path))
    assert result.returncode == 1
    assert f"{path}#1 (minimal): valid" in result.stdout
    assert f"{path}#2 (second): invalid" in result.stdout
    assert f"{path}#3 (ml): skipped" in result.stdout


def test_unreadable_and_malformed_files_are_errors_not_crashes(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = leanserve("validate", str(broken), str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "invalid YAML" in result.stdout
    assert "cannot read" in result.stdout
    assert "Traceback" not in result.stderr


def test_version_and_help_work():
    assert leanserve("--version").stdout.startswith("leanserve ")
    assert "validate" in leanserve("--help").stdout
