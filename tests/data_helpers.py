"""What the data tests share."""
from __future__ import annotations

import pytest

from clipsvd.data.prepare import prepare_dataset
from clipsvd.errors import DataError


def assert_prepare_fails_cleanly(dataset, tmp_path, named: str, *also: str) -> None:
    """Preparation stops with one line naming ``named`` (and one more line for each of
    ``also``, the other problems of the declaration) and leaves no output, not even a
    temporary folder."""
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_dataset(dataset, out, 8)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + len(also), lines
    for line, text in zip(lines, (named, *also)):
        assert text in line, (text, line)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
