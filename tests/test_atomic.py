"""padim.atomic: outputs are complete or absent."""

from __future__ import annotations

import pytest

from padim.atomic import atomic_path, write_text


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    write_text(target, "previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
