"""``labelgen.atomic.staged_folder``: replacing a whole folder (a copy, an imported run, a YOLO split) safely."""
import os

import pytest

from labelgen.atomic import TMP_MARK, remove_staged_leftovers, staged_folder
from labelgen.errors import StoreWriteError


def test_staged_folder_swaps_in_whole_and_calls_finish_last(tmp_path):
    final = tmp_path / "copy"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    seen = []
    with staged_folder(final, "test copy", finish=lambda folder: seen.append(sorted(os.listdir(folder)))) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".copy{TMP_MARK}{os.getpid()}-")
        (tmp / "new.txt").write_text("new")
    assert seen == [["new.txt"]] and sorted(os.listdir(final)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_staged_folder_leaves_the_old_folder_on_error_and_types_os_errors(tmp_path):
    final = tmp_path / "copy"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(final, "test copy") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("writer bug")
    with pytest.raises(StoreWriteError, match="cannot write test copy"):
        with staged_folder(final, "test copy"):
            raise PermissionError(13, "Permission denied")
    assert sorted(os.listdir(tmp_path)) == ["copy"] and sorted(os.listdir(final)) == ["keep.txt"]


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    final = tmp_path / "copy"
    dead, alive = 2**22 + 12345, os.getppid()  # a pid above the default pid_max; the parent process runs
    for name in (f".copy{TMP_MARK}{dead}-ab", f".copy.old-{dead}-cd", f".copy{TMP_MARK}{alive}-ef", ".copy-mine"):
        (tmp_path / name).mkdir()
    assert remove_staged_leftovers(final) == 2
    assert sorted(os.listdir(tmp_path)) == [".copy-mine", f".copy{TMP_MARK}{alive}-ef"]
    assert remove_staged_leftovers(final, any_writer=True) == 1
