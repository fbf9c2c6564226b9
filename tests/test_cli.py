"""`modelprobe validate | schema | new` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from modelprobe.cli import SCHEMA_PATH, json_schema, main
from modelprobe.kinds import KINDS
from modelprobe.spec.yaml_loader import load_yaml

SKELETONS = {name: KINDS[name].skeleton for name in KINDS}
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_new_writes_a_skeleton_that_validates_for_every_kind(tmp_path, capsys, kind):
    assert SKELETONS[kind]
    (tmp_path / "data").symlink_to(ROOT / "probes" / "data")  # skeletons name the shipped data files
    assert main(["new", kind, "mine", "--directory", str(tmp_path)]) == 0
    assert main(["validate", str(tmp_path / "mine.probe.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["new", kind, "mine", "--directory", str(tmp_path)]) == 2  # no silent overwrite


def test_validate_reports_located_errors_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "bad.probe.yaml").write_text("kind: logit_lens\nprompts: x.jsonl\nclaims:\n  c:\n    expect: {}\n")
    (tmp_path / "good.probe.yaml").write_text(SKELETONS["logit_lens"])
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'bad.probe.yaml'}:5:13: claims.c.expect: name exactly one statistic" in out
    assert "good.probe.yaml: ok" not in out  # the skeleton's data file is not next to it here
    assert "good.probe.yaml:5:10: prompts: data file" in out


def test_committed_schema_is_current_and_accepts_every_shipped_probe():
    schema = json_schema()
    assert json.loads(SCHEMA_PATH.read_text()) == schema, "run `modelprobe schema` and commit the result"
    for path in sorted((ROOT / "probes").glob("*.probe.yaml")):
        data, _ = load_yaml(path)
        jsonschema.validate(data, schema)
