"""Atomic writes: the new file or the old one, never a torn one, and no temporary file left behind."""

import json
import os

import numpy as np
import pytest

from mechmem import alignment, atomic


def test_write_replaces_the_file_through_a_hidden_temporary_with_its_suffix(tmp_path):
    target = tmp_path / "arrays.npy"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert not target.exists()  # nothing at the target until the rename
        np.save(tmp, np.arange(3))  # np.save would append ".npy" to a name without it

    assert atomic.atomic_write(target, write) == target
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and seen[0].suffix == ".npy"
    assert str(os.getpid()) in seen[0].name
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npy"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "settings.json"
    atomic.atomic_json(target, {"epochs": 3})

    def half_then_fail(tmp):
        tmp.write_text('{"epochs": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"epochs": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "row.json"
    atomic.atomic_json(target, [1])
    with pytest.raises(TypeError):
        atomic.atomic_json(target, {"path": tmp_path})  # a Path is not JSON without default=str
    assert json.loads(target.read_text()) == [1] and len(list(tmp_path.iterdir())) == 1
    atomic.atomic_json(target, {"path": tmp_path}, default=str)
    assert json.loads(target.read_text()) == {"path": str(tmp_path)}


def test_json_options_and_text(tmp_path):
    atomic.atomic_json(tmp_path / "a.json", {"b": 1, "a": 2}, indent=2, sort_keys=True)
    assert (tmp_path / "a.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}'
    atomic.atomic_text(tmp_path / "t.md", "ünïcode\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "ünïcode\n"


def test_one_implementation():
    """The alignment runner's name for it is the shared helper, not a copy."""
    assert alignment.atomic_json is atomic.atomic_json


def test_outputs_are_written_through_the_atomic_helpers():
    """No library module or script writes a file in place: a file written there goes through
    atomic_write (its writer gets the temporary path), so an interrupted run never leaves half a file."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    in_place = re.compile(r"\.write_text\(|\.write_bytes\(|\.to_csv\((?!tmp)|\.to_parquet\(|np\.save\((?!tmp)|"
                          r"np\.savez(_compressed)?\(\s*(?!tmp)\S")
    allowed = {"mechmem/atomic.py", "mechmem/cnn/saving.py"}  # the helper itself; cnn's writer is called through it
    found = []
    for path in sorted([*root.glob("mechmem/*.py"), *root.glob("mechmem/cnn/*.py"), *root.glob("mechmem/viz/*.py"),
                        *root.glob("mechmem/tables/*.py"), *root.glob("experiments/*.py")]):
        rel = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if in_place.search(line) and "lambda" not in line and rel not in allowed:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_sha256_file_is_the_digest_of_the_bytes_whatever_the_block(tmp_path):
    import hashlib

    from mechmem.atomic import sha256_file

    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == sha256_file(tmp_path / "f", block=7) == hashlib.sha256(data).hexdigest()
