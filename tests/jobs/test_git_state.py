"""Provenance: the commit, whether the tree was dirty, and the diff when it was."""

import subprocess

from jobs import tracking


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_dirty_flag_and_diff(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(tracking, "SOURCE_DIR", tmp_path)
    tags = tracking.run_tags("h", "crr", 1)
    assert tags["git_dirty"] == "false" and len(tags["git_commit"]) == 40
    assert tracking.git_diff() is None
    (tmp_path / "new_untracked.py").write_text("")  # untracked files do not make the tree dirty
    assert tracking.run_tags("h", "crr", 1)["git_dirty"] == "false"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert tracking.run_tags("h", "crr", 1)["git_dirty"] == "true"
    diff = tracking.git_diff()
    assert "-x = 1" in diff and "+x = 2" in diff


def test_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    tags = tracking.run_tags("h", "crr", 1)
    assert tags["git_commit"] == "unknown" and tags["git_dirty"] == "unknown" and tracking.git_diff() is None
