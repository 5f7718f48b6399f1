"""Unreadable checkpoints are skipped for the previous good one; none readable is a clear error."""

import pytest

from suite.training.checkpoint import CheckpointError, Checkpointer


def test_torn_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    ck = Checkpointer(tmp_path, 1, keep=2)
    ck.save({"progress": {"epoch": 1}}, 1)
    newest = ck.save({"progress": {"epoch": 2}}, 2)
    newest.write_bytes(newest.read_bytes()[:20])  # a write cut short
    assert ck.latest()["progress"]["epoch"] == 1
    assert f"skipping unreadable checkpoint {newest}" in capsys.readouterr().err


def test_no_readable_checkpoint_names_every_file(tmp_path):
    ck = Checkpointer(tmp_path, 1)
    ck.save({"progress": {}}, 1).write_bytes(b"garbage")
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*ckpt_00000002.pt.*ckpt_00000001.pt"):
        ck.latest()


def test_no_checkpoint_is_none(tmp_path):
    assert Checkpointer(tmp_path / "none", 1).latest() is None
