"""All-or-nothing output directories and the refusal of outputs that overlap inputs."""

import os

import pytest

from absorbdeploy import atomic
from absorbdeploy.errors import UserError


def test_commit_renames_and_a_failure_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with atomic.Staging(out, overwrite=False) as staging:
        (staging.path / "a.txt").write_text("x")
        staging.commit()
    assert (out / "a.txt").read_text() == "x" and not (tmp_path / "run.tmp").exists()
    assert not (out / atomic.MARKER).exists()
    with pytest.raises(RuntimeError):
        with atomic.Staging(tmp_path / "other", overwrite=False) as staging:
            (staging.path / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.tmp").exists()


def test_outputs_overlapping_inputs_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(model, tmp_path / "link")
    for out, fragment in [(model, "is the input"), (model / "sub", "lies inside"), (tmp_path, "contains"),
                          (tmp_path / "link", "is the input")]:
        with pytest.raises(UserError, match=fragment):
            atomic.check_destination(out, overwrite=True, inputs=[model])
    atomic.check_destination(tmp_path / "elsewhere", overwrite=False, inputs=[model])


def test_the_current_directory_is_never_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="current directory"):
        atomic.check_destination(tmp_path, overwrite=True)
    assert atomic.staging_path(tmp_path / ".").name == f"{tmp_path.name}.tmp"
