"""hf_camhd.files: atomic writes, recovery of what an interrupted write left, and checked reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_camhd.files import (
    CorruptFileError,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_json,
    check_file,
    check_files,
    commit_dir,
    is_leftover,
    partial_path,
    read_json,
    recover_leftovers,
)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_old_version(tmp_path):
    target = tmp_path / "results.md"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_temporary_names_keep_the_suffix_and_are_recognised(tmp_path):
    with atomic_path(tmp_path / "learning_curves.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and is_leftover(tmp)
        tmp.write_bytes(b"png")
    assert partial_path(tmp_path / "step_8").name == ".step_8.partial"
    assert not is_leftover(tmp_path / "results.json") and not is_leftover(tmp_path / ".cache")


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a.bin").write_bytes(b"1")
        assert not target.exists()
    assert (target / "a.bin").read_bytes() == b"1"
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(target) as d:
            (d / "b.bin").write_bytes(b"2")
            raise ValueError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"]
    with atomic_dir(target) as d:  # replacing an existing folder swaps it as a whole
        (d / "c.bin").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["c.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recover_leftovers_removes_partial_writes_and_restores_a_folder_moved_aside(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / ".results.json.partial-1a2b3c4d.json").write_text('{"half')       # a torn file write
    (tmp_path / ".step_8.partial").mkdir()                                       # a folder never renamed
    aside = tmp_path / ".model.replaced-0badcafe"                                 # killed between two renames
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"old weights")
    done = recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"old weights"
    assert len(done) == 3 and any("restored" in line for line in done)
    assert recover_leftovers(tmp_path) == [] and recover_leftovers(tmp_path / "missing") == []


def test_commit_dir_over_an_existing_folder_deletes_the_old_one(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "old.txt").write_text("x")
    new = tmp_path / ".hub.partial"
    new.mkdir()
    (new / "new.txt").write_text("y")
    commit_dir(new, tmp_path / "hub")
    assert [p.name for p in (tmp_path / "hub").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


# ------------------------------------------------------------------------------------------------ checked reads
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_read_json_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"runs": [1, 2, 3]})
    _truncate(path)
    with pytest.raises(CorruptFileError, match=r"results file '.*results\.json' is truncated or corrupted .*not "
                                               r"valid JSON.*Delete it"):
        read_json(path, what="results file", fix="Delete it.")


@pytest.mark.parametrize("name, write", [
    ("optimizer.pt", lambda p: torch.save({"state": {0: {"exp_avg": torch.ones(1000)}}}, p)),
    ("model.safetensors", lambda p: save_file({"w": torch.ones(1000)}, str(p))),
    ("progress.json", lambda p: p.write_text(json.dumps({"global_step": 8, "history": [1.0] * 50}))),
])
def test_check_files_finds_a_truncated_file(tmp_path, name, write):
    write(tmp_path / name)
    assert check_files(tmp_path, required=(name,), fix="-") == tmp_path
    _truncate(tmp_path / name)
    with pytest.raises(CorruptFileError, match=rf"file '.*{name}' is truncated or corrupted \(.*\)\. Delete that"):
        check_files(tmp_path, fix="Delete that folder.")


def test_check_files_names_a_missing_or_empty_file(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"is incomplete: trainer_state\.json is missing .*killed while saving"):
        check_files(tmp_path, required=("trainer_state.json",), fix="-")
    with pytest.raises(CorruptFileError, match=r"optimizer\.pt' is truncated or corrupted \(empty \(0 bytes\)\)"):
        check_files(tmp_path, fix="-")
    with pytest.raises(CorruptFileError, match=r"Checkpoint '.*nope' is not a folder"):
        check_files(tmp_path / "nope", fix="-")
    with pytest.raises(CorruptFileError, match=r"'.*state\.pt' is missing\. Rerun"):
        check_file(tmp_path / "state.pt", fix="Rerun.")


def test_check_files_finds_a_flipped_byte(tmp_path):
    path = tmp_path / "scheduler.pt"
    torch.save({"last_epoch": 3, "w": torch.arange(4000.0)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"scheduler\.pt' is truncated or corrupted \(.*checksum"):
        check_files(tmp_path, fix="-")


def test_tree_save_is_atomic(tmp_path):
    from hf_camhd import build_hierarchy
    from hf_camhd.hierarchy import LRTree

    tree = build_hierarchy(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), ("global", "layer"))
    tree.save(tmp_path / "tree.json")
    assert LRTree.load(tmp_path / "tree.json").num_nodes("layer") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["tree.json"]
