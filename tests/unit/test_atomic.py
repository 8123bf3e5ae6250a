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


def test_committed_files_get_the_usual_modes_whatever_wrote_them(tmp_path):
    """safetensors saves through a private (0600) temporary file; the export must be readable by another account."""
    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        with atomic.Staging(tmp_path / "run", overwrite=False) as staging:
            (staging.path / "bitmask").mkdir(mode=0o700)
            save_file({"w": torch.ones(2)}, str(staging.path / "bitmask" / "model.safetensors"))
            os.chmod(staging.path / "bitmask" / "model.safetensors", 0o600)
            (staging.path / "config.json").write_text("{}")
            staging.commit()
    finally:
        os.umask(mask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*")}
    assert modes == {"run/bitmask": 0o755, "run/bitmask/model.safetensors": 0o644, "run/config.json": 0o644}
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
