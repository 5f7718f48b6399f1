"""Checkpoint files: written atomically, verified on load; torn or corrupted ones are never loaded."""

import io
import random

import pytest
import torch

from suite.training.checkpoint import (
    DELAY_ENV, CheckpointError, Checkpointer, TornCheckpoint, decode, encode,
)


def _good(tmp_path):
    ck = Checkpointer(tmp_path, 1, keep=3)
    ck.save({"progress": {"epoch": 1}, "w": torch.arange(5.0)}, 1)
    return ck, ck.save({"progress": {"epoch": 2}, "w": torch.arange(3000.0)}, 2)


def test_every_truncation_and_bit_flip_of_the_newest_is_rejected(tmp_path, capsys):
    ck, newest = _good(tmp_path)
    data = newest.read_bytes()
    rng = random.Random(0)
    cuts = sorted({0, 1, 7, 8, 47, 48, 49, len(data) - 1, *rng.sample(range(len(data)), 40)})
    for cut in cuts:  # a write cut short anywhere
        newest.write_bytes(data[:cut])
        assert ck.latest()["progress"]["epoch"] == 1, cut
    for pos in rng.sample(range(len(data)), 40):  # one flipped bit anywhere: header or payload
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        newest.write_bytes(bytes(flipped))
        assert ck.latest()["progress"]["epoch"] == 1, pos
    err = capsys.readouterr().err
    assert err.count(f"skipping unreadable checkpoint {newest}") == len(cuts) + 40
    newest.write_bytes(data)
    assert ck.latest()["progress"]["epoch"] == 2


def test_decode_says_why():
    data = encode({"progress": {}})
    with pytest.raises(TornCheckpoint, match="torn: 10 of"):
        decode(data[:58])
    with pytest.raises(TornCheckpoint, match="checksum mismatch"):
        decode(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="not a deqbench checkpoint"):
        decode(b"garbage, not a checkpoint")


def test_only_torn_files_start_afresh_but_an_intact_foreign_file_is_an_error(tmp_path):
    ck = Checkpointer(tmp_path, 1)
    ck.save({"progress": {}}, 1).write_bytes(encode({"progress": {}})[:100])
    assert ck.latest() is None  # nothing usable: train from the beginning
    (tmp_path / "ckpt_00000002.pt").write_bytes(encode([1, 2]))  # intact, but not a training checkpoint
    with pytest.raises(CheckpointError, match="ckpt_00000002.pt .not a training checkpoint.*ckpt_00000001.pt .TornCheckpoint"):
        ck.latest()


def test_legacy_bare_torch_save_files_still_load(tmp_path):
    buf = io.BytesIO()
    torch.save({"progress": {"epoch": 4}}, buf)
    (tmp_path / "ckpt_00000004.pt").write_bytes(buf.getvalue())
    assert Checkpointer(tmp_path, 1).latest()["progress"]["epoch"] == 4


def test_a_killed_saves_temporary_file_is_never_loaded_and_is_removed(tmp_path, monkeypatch):
    ck, _ = _good(tmp_path)
    partial = tmp_path / ".ckpt_00000003.pt.999.tmp"
    partial.write_bytes(encode({"progress": {"epoch": 3}}))  # even a complete one: it was never renamed
    assert ck.latest()["progress"]["epoch"] == 2
    monkeypatch.setenv(DELAY_ENV, "0.001")  # the chunked, slowed write path writes the same bytes
    ck.save({"progress": {"epoch": 3}, "w": torch.ones(2000)}, 3)
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_00000001.pt", "ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert torch.equal(ck.latest()["w"], torch.ones(2000))

