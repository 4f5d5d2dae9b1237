"""The checkpoint folder: strict names, a `latest` kept inside the run, completeness
marked by a manifest written last, stale leftovers cleaned, pruning per run, and a
full disk reported as one clear error naming the file."""

import json
import os

import pytest
import torch

from fastencdec.training import checkpoint as ckpt
from fastencdec.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    step_from_name,
)


def _save(mgr, step, value=None):
    return mgr.save(step, {"step": step, "w": torch.full((2,), float(step if value is None
                                                                       else value))})


def test_step_names_are_parsed_strictly():
    assert step_from_name("step_00000012") == 12
    for name in ("step_00000012.bak", "step_12", "step_00000012.tmp", "xstep_00000012",
                 "step_0000001a", "step_000000012", "latest"):
        assert step_from_name(name) is None, name


def test_stray_folders_and_files_do_not_break_saving(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save(mgr, 1)
    os.makedirs(tmp_path / "step_00000008.bak")  # a user's backup copy
    (tmp_path / "step_00000009").write_text("not a folder")
    os.makedirs(tmp_path / "notes")
    for step in (2, 3):
        _save(mgr, step)
    assert mgr.list_steps() == [2, 3]
    assert (tmp_path / "step_00000008.bak").is_dir()  # never touched
    assert mgr.latest().endswith("step_00000003")


def test_a_folder_without_manifest_is_incomplete(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 1)
    _save(mgr, 2)
    # as if killed while pruning (or mid-save): state.pt without its manifest
    os.remove(tmp_path / "step_00000002" / "manifest.json")
    assert mgr.list_steps() == [1]
    (tmp_path / "latest").write_text("step_00000002")
    with pytest.warns(UserWarning, match="does not name a complete checkpoint"):
        assert mgr.latest().endswith("step_00000001")
    with pytest.raises(CheckpointError, match="incomplete"):
        CheckpointManager.load(tmp_path / "step_00000002")


@pytest.mark.parametrize("pointer", ["../other-run/checkpoints/step_00000009", "/tmp/step_00000009",
                                     "step_00000009", "", "garbage\n\n"])
def test_latest_is_only_followed_inside_the_run(tmp_path, pointer):
    other = tmp_path / "other-run" / "checkpoints"
    _save(CheckpointManager(other), 9, value=99.0)  # a complete checkpoint elsewhere
    mine = tmp_path / "run" / "checkpoints"
    mgr = CheckpointManager(mine)
    _save(mgr, 4)
    (mine / "latest").write_text(pointer)
    with pytest.warns(UserWarning):
        path = mgr.latest()
    assert os.path.dirname(path) == str(mine) and path.endswith("step_00000004")
    state, _ = CheckpointManager.load(path)
    assert state["step"] == 4


def test_missing_latest_uses_the_newest_complete_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        _save(mgr, step)
    os.remove(tmp_path / "latest")
    assert mgr.latest().endswith("step_00000002")
    assert CheckpointManager(tmp_path / "empty").latest() is None


def test_stale_leftovers_are_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1)
    for name in ("step_00000002.tmp", "step_00000001.del"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "state.pt").write_bytes(b"partial")
    (tmp_path / "latest.tmp123").write_text("step_00000002")
    assert sorted(mgr.clean_stale()) == ["latest.tmp123", "step_00000001.del",
                                         "step_00000002.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]


def test_pruning_only_touches_this_run(tmp_path):
    old = CheckpointManager(tmp_path, keep_last=1, run_id="old-run")
    for step in (5, 6):
        _save(old, step)
    assert old.list_steps() == [6]
    new = CheckpointManager(tmp_path, keep_last=2, run_id="new-run")
    for step in (1, 2, 3):
        _save(new, step)
    assert new.list_steps(run_id="new-run") == [2, 3]
    assert new.list_steps(run_id="old-run") == [6]  # the other run's checkpoint survives
    manifest = CheckpointManager.manifest(tmp_path / "step_00000003")
    assert manifest["run_id"] == "new-run" and manifest["step"] == 3


def test_manifest_is_written_last(tmp_path, monkeypatch):
    order = []
    real_save, real_text = ckpt.atomic_torch_save, ckpt._atomic_write_text
    monkeypatch.setattr(ckpt, "atomic_torch_save",
                        lambda obj, path: (order.append(os.path.basename(path)),
                                           real_save(obj, path)))
    monkeypatch.setattr(ckpt, "_atomic_write_text",
                        lambda path, text: (order.append(os.path.basename(path)),
                                            real_text(path, text)))
    _save(CheckpointManager(tmp_path, config_hash="abc"), 7)
    assert order == ["rng_rank0.pt", "state.pt", "manifest.json", "latest"]
    manifest = json.loads((tmp_path / "step_00000007" / "manifest.json").read_text())
    assert manifest["config_hash"] == "abc" and "state.pt" in manifest["files"]


def test_full_disk_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1)
    real_open = ckpt._open_for_write
    # writes to /dev/full fail with ENOSPC, as on a full disk
    monkeypatch.setattr(ckpt, "_open_for_write",
                        lambda path: open("/dev/full", "wb") if "state.pt" in path
                        else real_open(path))
    with pytest.raises(CheckpointWriteError) as info:
        _save(mgr, 2)
    message = str(info.value)
    assert "step_00000002.tmp" in message and "state.pt" in message
    assert "disk full" in message and "\n" not in message
    assert mgr.list_steps() == [1] and mgr.latest().endswith("step_00000001")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]  # nothing half-written
