"""What the data tests share."""
from __future__ import annotations

import pytest

from clipsvd.data.prepare import prepare_dataset
from clipsvd.errors import DataError


def assert_prepare_fails_cleanly(dataset, tmp_path, named: str) -> None:
    """Preparation stops with one line naming ``named`` and leaves no output, not even a
    temporary folder."""
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_dataset(dataset, out, 8)
    message = str(info.value)
    assert named in message and "\n" not in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
