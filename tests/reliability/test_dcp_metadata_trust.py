"""Distributed-checkpoint metadata is unpickled with an allow-list: a planted pickle that
would run code is refused with a CheckpointError and never executed."""

import os
import pickle

import pytest

from executor.checkpoint import CheckpointError
from executor.parallel.dcp import _safe_reader


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_metadata_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError, match="not allowed in checkpoint metadata"):
        _safe_reader(tmp_path).read_metadata()
    assert not marker.exists()


def test_real_metadata_is_accepted(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(tmp_path), no_dist=True)
    meta = _safe_reader(tmp_path).read_metadata()
    assert "w" in meta.state_dict_metadata
