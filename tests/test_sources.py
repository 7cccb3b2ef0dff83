"""Image sources: folder walk, list files, COCO JSON, auto detection, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labelgen.errors import ImageSourceError
from labelgen.structures.instances import ImageRecord
from labelgen.engine.sources import (
    DEFAULT_EXTENSIONS,
    SOURCES,
    CocoJsonSource,
    FolderSource,
    ImageSource,
    ListFileSource,
    open_source,
)
from labelgen.testing.images import make_corrupt_corpus


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _touch(
        root,
        "b.jpg", "A.JPG", "c.Png", "notes.txt", "noext", ".hidden.jpg",
        "sub/d.jpeg", "sub/deeper/e.webp", ".cache/f.jpg", "sub/.g.png", "z/Tiff.TIF",
    )
    return root


def _ids(source: ImageSource) -> list[str]:
    return [record.image_id for record in source.list_records()]


# -- folder -------------------------------------------------------------------------------
def test_folder_lists_sorted_recursive_mixed_case_and_skips_hidden(tree):
    records = FolderSource(tree).list_records()
    expected = ["A.JPG", "b.jpg", "c.Png", "sub/d.jpeg", "sub/deeper/e.webp", "z/Tiff.TIF"]
    assert [r.image_id for r in records] == expected
    for record in records:
        assert record.uri == str(tree / record.image_id) and os.path.isabs(record.uri)
        assert (record.width, record.height, record.sha256) == (None, None, None)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"recursive": False}, ["A.JPG", "b.jpg", "c.Png"]),
        ({"extensions": ["PNG", ".webp"]}, ["c.Png", "sub/deeper/e.webp"]),
        ({"extensions": ".tif", "recursive": True}, ["z/Tiff.TIF"]),
        ({"extensions": [".txt"]}, ["notes.txt"]),
    ],
)
def test_folder_options(tree, options, expected):
    assert _ids(FolderSource(tree, **options)) == expected


def test_folder_describe_is_json_and_absolute(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    spec = FolderSource("images", extensions=[".PNG", "jpg"]).describe()
    assert spec == {"kind": "folder", "root": str(tree), "recursive": True, "extensions": [".jpg", ".png"]}
    assert json.loads(json.dumps(spec)) == spec
    assert FolderSource(tree).describe()["extensions"] == sorted(DEFAULT_EXTENSIONS)


@pytest.mark.parametrize(
    ("make_root", "message"),
    [
        (lambda tmp: tmp / "absent", "does not exist"),
        (lambda tmp: tmp / "file.jpg", "not a folder"),
    ],
)
def test_folder_bad_root(tmp_path, make_root, message):
    _touch(tmp_path, "file.jpg")
    with pytest.raises(ImageSourceError, match=message):
        FolderSource(make_root(tmp_path))


@pytest.mark.parametrize("extensions", [[], [""], ["."], [3]])
def test_folder_bad_extensions(tree, extensions):
    with pytest.raises(ImageSourceError, match="extension"):
        FolderSource(tree, extensions=extensions)


def test_folder_follows_symlinked_folder_without_looping(tree):
    os.symlink(tree / "sub", tree / "z" / "link")
    os.symlink(tree, tree / "sub" / "loop")
    ids = _ids(FolderSource(tree))
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert "sub/d.jpeg" in ids and "z/Tiff.TIF" in ids and "z/link/d.jpeg" not in ids


def test_folder_lists_unreadable_entries_so_they_fail_alone(tmp_path):
    """Loops, dangling symlinks, FIFOs and device symlinks with an image name are listed (each fails
    later with a reason in the ledger): neither an aborted listing nor a silent skip."""
    root = tmp_path / "images"
    _touch(root, "good.jpg", "sub/inner.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")  # ELOOP on stat
    os.symlink("ring_b.jpg", root / "ring_a.jpg")
    os.symlink("ring_a.jpg", root / "ring_b.jpg")
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "fifo.png")
    os.symlink("knot", root / "knot")  # a loop without an image extension: not listed, no abort
    os.symlink("..", root / "sub" / "up")  # a folder loop: cut
    os.symlink("../sub", root / "sub" / "again.jpg")  # a folder named like an image: walked (once)
    assert _ids(FolderSource(root)) == ["dangling.jpg", "fifo.png", "good.jpg", "loop.jpg", "ring_a.jpg",
                                        "ring_b.jpg", "sub/inner.jpg", "zero.jpg"]


def test_folder_ids_of_non_utf8_names_are_the_bytes_of_the_name(tmp_path):
    raw = os.fsencode(tmp_path) + b"/bad\xff\xfename.jpg"
    with open(raw, "wb") as handle:
        handle.write(b"x")
    (record,) = FolderSource(tmp_path).list_records()
    assert record.image_id == "bad\udcff\udcfename.jpg" and os.fsencode(record.uri) == raw
    assert ImageRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda root: None, {}, "no images found in folder"),
        (lambda root: _touch(root, "notes.txt", ".hidden.jpg", ".cache/a.jpg"), {}, "no images found in folder"),
        (lambda root: _touch(root, "sub/a.jpg"), {"recursive": False}, "subfolders not searched"),
        (lambda root: _touch(root, "a.png"), {"extensions": [".jpg"]}, r"extensions \.jpg"),
    ],
)
def test_folder_without_images_is_an_error(tmp_path, make, options, message):
    root = tmp_path / "images"
    root.mkdir()
    make(root)
    with pytest.raises(ImageSourceError, match=message) as caught:
        FolderSource(root, **options).list_records()
    assert str(root) in str(caught.value) and "expected at least one image" in str(caught.value)


def test_folder_on_corrupt_corpus_lists_every_file(tmp_path):
    expected = make_corrupt_corpus(tmp_path)
    assert _ids(FolderSource(tmp_path)) == sorted(expected)


def test_folder_many_files_are_listed_quickly(tmp_path):
    _touch(tmp_path, *(f"d{i % 7}/img_{i:05d}.jpg" for i in range(2000)))
    ids = _ids(FolderSource(tmp_path))
    assert len(ids) == 2000 and ids[0] == "d0/img_00000.jpg"


# -- list file ----------------------------------------------------------------------------
def test_list_file_with_comments_relative_and_absolute_paths(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = tmp_path / "elsewhere" / "abs.png"
    (lists / "images.txt").write_text(
        "\ufeff# training images\n\n  b.jpg  \n./sub//a.jpg\n../up.jpg\nwin\\style.jpg\n"
        f"{absolute}\n   # indented comment\nmissing.jpg\n",
        encoding="utf-8",
    )
    records = {r.image_id: r.uri for r in ListFileSource(lists / "images.txt").list_records()}
    assert records == {
        "b.jpg": str(lists / "b.jpg"),
        "sub/a.jpg": str(lists / "sub" / "a.jpg"),
        "../up.jpg": str(tmp_path / "up.jpg"),
        "win/style.jpg": str(lists / "win" / "style.jpg"),
        str(absolute): str(absolute),
        "missing.jpg": str(lists / "missing.jpg"),  # not checked at listing time
    }
    assert list(records) == sorted(records)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.jpg\n./a.jpg\n", "twice"),
        ("sub/x.jpg\nsub//x.jpg\n", "twice"),
    ],
)
def test_list_file_duplicate_ids(tmp_path, content, message):
    (tmp_path / "l.txt").write_text(content)
    with pytest.raises(ImageSourceError, match=message):
        ListFileSource(tmp_path / "l.txt").list_records()


def test_list_file_errors(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        ListFileSource(tmp_path / "absent.txt")
    with pytest.raises(ImageSourceError, match="is a folder"):
        ListFileSource(tmp_path)


def test_list_file_lines_that_are_not_utf8_are_the_bytes_of_a_name(tmp_path):
    """A list written by ``find`` on non-UTF-8 names: each line names the file with those bytes."""
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfgood.jpg\r\nbad\xff\xfe.jpg\ncaf\xe9.jpg\n# c\xe9\n")
    records = ListFileSource(tmp_path / "l.txt").list_records()
    assert [r.image_id for r in records] == ["bad\udcff\udcfe.jpg", "caf\udce9.jpg", "good.jpg"]
    assert os.fsencode(records[0].uri) == os.fsencode(tmp_path) + b"/bad\xff\xfe.jpg"
    assert os.fsencode(records[1].uri) == os.fsencode(tmp_path) + b"/caf\xe9.jpg"


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only a comment\n   \n"])
def test_list_file_without_paths_is_an_error(tmp_path, content):
    (tmp_path / "l.txt").write_bytes(content)
    with pytest.raises(ImageSourceError, match="lists no image paths"):
        ListFileSource(tmp_path / "l.txt").list_records()


def test_coco_without_images_is_an_error(tmp_path):
    path = _write_json(tmp_path / "ann.json", {"images": [], "annotations": []})
    with pytest.raises(ImageSourceError, match="empty 'images' list"):
        CocoJsonSource(path).list_records()


def test_list_file_describe(tmp_path):
    (tmp_path / "l.lst").write_text("a.jpg\n")
    assert ListFileSource(tmp_path / "l.lst").describe() == {"kind": "list", "path": str(tmp_path / "l.lst")}


# -- COCO JSON ----------------------------------------------------------------------------
def _write_json(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_coco_records_use_file_name_and_sizes(tmp_path):
    images = [
        {"id": 2, "file_name": "b/x.jpg", "width": 640, "height": 480},
        {"id": 1, "file_name": "a.jpg", "width": 10.0, "height": 20},
        {"id": 3, "file_name": "c.png"},
    ]
    path = _write_json(tmp_path / "ann.json", {"images": images, "annotations": []})
    records = CocoJsonSource(path).list_records()
    assert records == [
        ImageRecord("a.jpg", str(tmp_path / "a.jpg"), 10, 20),
        ImageRecord("b/x.jpg", str(tmp_path / "b" / "x.jpg"), 640, 480),
        ImageRecord("c.png", str(tmp_path / "c.png")),
    ]


def test_coco_images_root(tmp_path):
    path = _write_json(tmp_path / "ann.json", {"images": [{"file_name": "a.jpg"}]})
    source = CocoJsonSource(path, images_root=tmp_path / "pics")
    assert source.list_records()[0].uri == str(tmp_path / "pics" / "a.jpg")
    assert source.describe() == {"kind": "coco", "path": str(path), "images_root": str(tmp_path / "pics")}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "no 'images' list"),
        ({"annotations": []}, "no 'images' list"),
        ({"images": {"a": 1}}, "no 'images' list"),
        ({"images": ["a.jpg"]}, r"images\[0\] is a str; expected an object"),
        ({"images": [{"id": 1}]}, r"images\[0\] has file_name None; expected a non-empty string"),
        ({"images": [{"file_name": ""}]}, "expected a non-empty string"),
        ({"images": [{"file_name": 5}]}, "expected a non-empty string"),
        ({"images": [{"file_name": "a.jpg", "width": 0}]}, r"images\[0\]\.width is 0; expected a positive int"),
        ({"images": [{"file_name": "a.jpg", "height": "480"}]}, "expected a positive integer"),
        ({"images": [{"file_name": "a.jpg"}, {"file_name": "a.jpg"}]}, "twice"),
    ],
)
def test_coco_errors(tmp_path, data, message):
    path = _write_json(tmp_path / "ann.json", data)
    with pytest.raises(ImageSourceError, match=message):
        CocoJsonSource(path).list_records()


def test_coco_missing_file(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        CocoJsonSource(tmp_path / "absent.json")


# -- open_source --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind", "cls"),
    [
        ("images", "auto", FolderSource),
        ("ann.json", "auto", CocoJsonSource),
        ("ANN.JSON", "auto", CocoJsonSource),
        ("list.txt", "auto", ListFileSource),
        ("list.lst", "auto", ListFileSource),
        ("paths", "auto", ListFileSource),
        ("ann.json", "list", ListFileSource),
        ("images", "folder", FolderSource),
    ],
)
def test_open_source_detects_kind(tmp_path, name, kind, cls):
    (tmp_path / "images").mkdir()
    for file_name in ("ann.json", "ANN.JSON"):
        _write_json(tmp_path / file_name, {"images": []})
    for file_name in ("list.txt", "list.lst", "paths"):
        (tmp_path / file_name).write_text("a.jpg\n")
    source = open_source(str(tmp_path / name), kind=kind)
    assert type(source) is cls and SOURCES[source.describe()["kind"]] is cls


def test_open_source_passes_options(tmp_path):
    source = open_source(tmp_path, recursive=False, extensions=[".png"])
    assert source.describe()["recursive"] is False and source.describe()["extensions"] == [".png"]
    path = _write_json(tmp_path / "ann.json", {"images": []})
    assert open_source(path, images_root=tmp_path / "x").describe()["images_root"] == str(tmp_path / "x")


def test_open_source_auto_ignores_options_of_other_kinds(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg\n")
    assert isinstance(open_source(tmp_path / "l.txt", extensions=[".png"], recursive=False), ListFileSource)
    with pytest.raises(ImageSourceError, match="does not take option"):
        open_source(tmp_path / "l.txt", extensions=[".png"], kind="list")
    with pytest.raises(ImageSourceError, match=r"does not take option\(s\) \['recursve'\]"):
        open_source(tmp_path, recursve=False)  # a typo is taken by no kind


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("s3", {}, "unknown image source kind 's3'; expected one of: auto, coco, folder, list"),
        ("folder", {"images_root": "x"}, "does not take option"),
        ("list", {"recursive": True}, "accepts: \\(none\\)"),
    ],
)
def test_open_source_errors(tmp_path, kind, options, message):
    with pytest.raises(ImageSourceError, match=message):
        open_source(tmp_path, kind=kind, **options)


def test_open_source_missing_path(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist; expected a folder of images"):
        open_source(tmp_path / "typo")


def test_duplicate_ids_from_a_custom_source_are_rejected():
    class Fixed(ImageSource):
        kind = "fixed"

        def describe(self):
            return {"kind": self.kind}

        def _records(self):
            pairs = [("x", "a.jpg"), ("x", "b.jpg"), ("y", "a.jpg")]
            return [ImageRecord(name, f"/{folder}/{name}") for folder, name in pairs]

    with pytest.raises(ImageSourceError, match="'a.jpg' twice"):
        Fixed().list_records()
