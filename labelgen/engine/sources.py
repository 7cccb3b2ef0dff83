"""Image sources: where the images of a run come from.

A source lists ``ImageRecord``s (sorted by ``image_id``, ids unique) without opening
any image; ``describe()`` returns a JSON-able spec used to detect "same source" when a
run is resumed. Unreadable images are not a listing error: they fail one by one later
(``labelgen.engine.decode``: ``missing``, ``symlink_loop``, ``not_a_regular_file``, ...), so
each becomes an entry of the run's failure ledger. A source that lists no image at all
is an ``ImageSourceError``: a run is never created for nothing.

File names need not be UTF-8: ids and uris are ``str`` decoded like ``os.fsdecode``
(UTF-8 with ``surrogateescape``), so ``os.fsencode(record.uri)`` gives back the exact
bytes of the name; the run store writes such ids escaped (``\\udcff``) and reads them
back unchanged.

Kinds: ``folder`` (``FolderSource``), ``list`` (``ListFileSource``: a text file with one
path per line), ``coco`` (``CocoJsonSource``: the ``images`` array of a COCO JSON).
"""
from __future__ import annotations

import abc
import inspect
import json
import os
import posixpath
from typing import Any, Iterable, Sequence

from ..errors import ImageSourceError, ValidationError
from ..structures.instances import ImageRecord

__all__ = ["DEFAULT_EXTENSIONS", "SOURCES", "CocoJsonSource", "FolderSource", "ImageSource",
           "ListFileSource", "open_source"]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageSource(abc.ABC):
    """Base of every source. Subclasses implement ``describe`` and ``_records``."""

    kind: str = ""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able spec; equal specs mean the same source (``{"kind": ..., ...}``)."""

    @abc.abstractmethod
    def _records(self) -> Iterable[ImageRecord]:
        """All records, in any order."""

    def list_records(self) -> list[ImageRecord]:
        """All records sorted by ``image_id``; raises ``ImageSourceError`` on duplicate ids
        and when there are none (``_none_found`` says what was looked for)."""
        records = sorted(self._records(), key=lambda record: record.image_id)
        if not records:
            raise ImageSourceError(self._none_found())
        for previous, current in zip(records, records[1:]):
            if previous.image_id == current.image_id:
                raise ImageSourceError(
                    f"{self.kind} source {self.describe()} lists image id {current.image_id!r} "
                    f"twice ({previous.uri!r} and {current.uri!r}); expected unique ids. "
                    "Remove the duplicate entry."
                )
        return records

    def _none_found(self) -> str:
        """The message of the error raised when the source lists no image."""
        return (f"{self.kind} source {self.describe()} lists no images; expected at least one image. "
                "Check the path.")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({fields})"


def _absolute(path: str | os.PathLike[str]) -> str:
    """Absolute, normalised path (``~`` expanded, symlinks kept)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _make_record(image_id: str, uri: str, where: str, **size: Any) -> ImageRecord:
    try:
        return ImageRecord(image_id=image_id, uri=uri, **size)
    except ValidationError as exc:
        raise ImageSourceError(f"{where}: {exc}") from None


# -- folder -------------------------------------------------------------------------------
class FolderSource(ImageSource):
    """Every image file under ``root`` whose extension (any case) is in ``extensions``.

    ``image_id`` is the posix path relative to ``root`` (``"sub/a.jpg"``); ``uri`` the
    absolute path. Names starting with ``.`` (files and folders) are skipped. Symlinked
    folders are followed, each real folder once: the first path in sorted depth-first
    order names its files, and loops are cut. Images are not opened.

    Every entry with an image extension that is not a folder is listed, whatever it is:
    a FIFO, a socket, a dangling symlink, a symlink loop (``ln -s x.jpg x.jpg``), a
    symlink to a device. Reading it then fails with a reason (``not_a_regular_file``,
    ``missing``, ``symlink_loop``), so it is in the failure ledger instead of silently
    missing. Listing costs one ``stat`` per symlink and none per plain file.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike[str], recursive: bool = True,
                 extensions: Sequence[str] = DEFAULT_EXTENSIONS):
        self.root = _absolute(root)
        self.recursive = bool(recursive)
        self.extensions = _normalise_extensions(extensions)
        if not os.path.isdir(self.root):
            what = "is a file, not a folder" if os.path.exists(self.root) else "does not exist"
            raise ImageSourceError(
                f"image folder {self.root!r} {what}; expected a folder of images. Check the path "
                "(use kind='list' or kind='coco' for list and COCO JSON files)."
            )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self.root, "recursive": self.recursive,
                "extensions": list(self.extensions)}

    def _records(self) -> Iterable[ImageRecord]:
        pending = [("", self.root)]
        visited: set[tuple[int, int]] = set()
        while pending:  # depth first, names sorted: which path reaches a folder is stable
            prefix, folder = pending.pop()
            subfolders = []
            for entry in self._scan(folder, visited):
                if entry.name.startswith("."):
                    continue
                if _is_folder(entry):
                    subfolders.append((prefix + entry.name + "/", entry.path))
                elif os.path.splitext(entry.name)[1].lower() in self.extensions:
                    yield ImageRecord(image_id=prefix + entry.name, uri=entry.path)
            if self.recursive:
                pending.extend(reversed(subfolders))

    def _none_found(self) -> str:
        searched = "subfolders included" if self.recursive else "subfolders not searched"
        return (f"no images found in folder {self.root!r} (extensions {', '.join(self.extensions)}; {searched};"
                " names starting with '.' skipped); expected at least one image file. Check the folder, or set"
                " images.extensions in the recipe to the extensions of your files.")

    def _scan(self, folder: str, visited: set[tuple[int, int]]) -> list[os.DirEntry[str]]:
        """Entries of ``folder``; none if it (by device and inode) was walked already."""
        try:
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in visited:
                return []  # reached again through a symlink: a loop or a second path
            visited.add((stat.st_dev, stat.st_ino))
            with os.scandir(folder) as entries:
                return sorted(entries, key=lambda entry: entry.name)
        except OSError as exc:
            raise ImageSourceError(
                f"cannot list folder {folder!r} under image folder {self.root!r}: "
                f"{exc.strerror or exc}; expected a readable folder. Fix its permissions."
            ) from None


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder or a symlink to one. A symlink that cannot be resolved (a loop,
    too long, no permission) is not a folder: it is listed, and fails alone when it is read."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    """``("JPG", ".png")`` -> ``(".jpg", ".png")``: lower case, leading dot, sorted, unique."""
    if isinstance(extensions, str):
        extensions = [extensions]
    cleaned = set()
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip(". "):
            raise ImageSourceError(
                f"image extensions must be non-empty strings like '.jpg'; got {ext!r} in {extensions!r}"
            )
        cleaned.add("." + ext.strip().lstrip(".").lower())
    if not cleaned:
        raise ImageSourceError(
            f"expected at least one image extension, e.g. {list(DEFAULT_EXTENSIONS)}; got none"
        )
    return tuple(sorted(cleaned))


# -- list file ----------------------------------------------------------------------------
class ListFileSource(ImageSource):
    """A text file with one image path per line.

    Lines are split on ``\\n`` (``\\r\\n`` too) and each is decoded on its own as UTF-8,
    with bytes that are not UTF-8 kept as ``surrogateescape`` (as ``os.fsdecode`` does):
    such a line is the exact byte name of a file on a POSIX file system (``find`` output
    of non-UTF-8 names), so it is listed and read like any other, and one odd line
    never costs the rest of the list. A leading UTF-8 BOM is dropped.
    Surrounding whitespace is stripped; blank lines and lines starting with ``#`` are
    ignored (no inline comments: ``#`` may be part of a file name). Backslashes count
    as ``/``. ``image_id`` is the path as written, posix-normalised (``./a//b.jpg`` ->
    ``a/b.jpg``); relative paths are relative to the list file's folder. Listed files
    are not checked here: a missing one fails later as ``missing``.
    """

    kind = "list"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = _absolute(path)
        if not os.path.isfile(self.path):
            what = "is a folder" if os.path.isdir(self.path) else "does not exist"
            raise ImageSourceError(
                f"image list file {self.path!r} {what}; expected a text file with one image path "
                "per line. Check the path (use kind='folder' for a folder of images)."
            )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path}

    def _records(self) -> Iterable[ImageRecord]:
        base = os.path.dirname(self.path)
        for number, line in enumerate(self._read_lines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            image_id = posixpath.normpath(text.replace("\\", "/"))
            uri = os.path.normpath(os.path.join(base, os.path.expanduser(image_id)))
            yield _make_record(image_id, uri, f"{self.path}, line {number}")

    def _none_found(self) -> str:
        return (f"image list file {self.path!r} lists no image paths (only blank lines or '#' comments); "
                "expected one image path per line. Check the file.")

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ImageSourceError(
                f"cannot read image list file {self.path!r}: {exc.strerror or exc}; "
                "expected a readable text file."
            ) from None
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        return [line.decode("utf-8", "surrogateescape") for line in data.splitlines()]


# -- COCO JSON ----------------------------------------------------------------------------
class CocoJsonSource(ImageSource):
    """The ``images`` array of a COCO JSON file.

    ``image_id`` is each entry's ``file_name`` exactly as written; ``uri`` is
    ``images_root / file_name`` (``images_root`` defaults to the JSON's folder); the
    entry's ``width``/``height``, when present, go into the record.
    """

    kind = "coco"

    def __init__(self, path: str | os.PathLike[str], images_root: str | os.PathLike[str] | None = None):
        self.path = _absolute(path)
        self.images_root = _absolute(images_root) if images_root is not None else os.path.dirname(self.path)
        if not os.path.isfile(self.path):
            raise ImageSourceError(
                f"COCO JSON file {self.path!r} does not exist or is not a file; "
                "expected a COCO annotation file with an 'images' list. Check the path."
            )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "images_root": self.images_root}

    def _records(self) -> Iterable[ImageRecord]:
        for index, entry in enumerate(self._load_images()):
            where = f"{self.path}: images[{index}]"
            if not isinstance(entry, dict):
                got = type(entry).__name__
                raise ImageSourceError(f"{where} is a {got}; expected an object with 'file_name'")
            file_name = entry.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                got = repr(file_name)
                raise ImageSourceError(f"{where} has file_name {got}; expected a non-empty string ('a.jpg')")
            size = {key: _coco_size(entry.get(key), f"{where}.{key}") for key in ("width", "height")}
            uri = os.path.normpath(os.path.join(self.images_root, file_name))
            yield _make_record(file_name, uri, where, **size)

    def _none_found(self) -> str:
        return (f"COCO JSON file {self.path!r} has an empty 'images' list; expected at least one image "
                'entry like {"file_name": "a.jpg"}. Check the file.')

    def _load_images(self) -> list[Any]:
        try:
            with open(self.path, encoding="utf-8-sig") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ImageSourceError(
                f"COCO JSON file {self.path!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}); expected a COCO annotation file."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageSourceError(
                f"cannot read COCO JSON file {self.path!r}: {exc}; expected a readable UTF-8 file."
            ) from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            got = type(data).__name__ if not isinstance(data, dict) else f"images={type(images).__name__}"
            raise ImageSourceError(
                f"COCO JSON file {self.path!r} has no 'images' list (got {got}); expected an object "
                'like {"images": [{"file_name": "a.jpg", "width": 640, "height": 480}, ...]}.'
            )
        return images


def _coco_size(value: Any, where: str) -> int | None:
    """A COCO ``width``/``height``: positive int (integral floats accepted) or absent."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ImageSourceError(f"{where} is {value!r}; expected a positive integer or no value")
    return value


# -- registry and auto detection ------------------------------------------------------------
#: kind name -> source class; ``open_source(spec, kind=name)`` looks kinds up here.
SOURCES: dict[str, type[ImageSource]] = {
    "folder": FolderSource, "list": ListFileSource, "coco": CocoJsonSource,
}


def open_source(spec: str | os.PathLike[str], kind: str = "auto", **options: Any) -> ImageSource:
    """Build a source from a path. ``kind="auto"``: folder -> ``folder``, ``*.json`` ->
    ``coco``, any other file -> ``list``. ``options`` go to the source's constructor.

    With ``kind="auto"`` the caller cannot know the kind in advance, so options that only
    other kinds take (e.g. ``extensions`` for a list file) are ignored; an option that
    no kind takes is still an error.
    """
    detected = _detect_kind(spec) if kind == "auto" else kind
    cls = SOURCES.get(detected)
    if cls is None:
        raise ImageSourceError(
            f"unknown image source kind {kind!r}; expected one of: auto, {', '.join(sorted(SOURCES))}."
        )
    if kind == "auto":
        accepted = _options_of(cls)
        options = {k: v for k, v in options.items() if k in accepted or not _taken_by_any_kind(k)}
    _check_options(detected, cls, options)
    return cls(spec, **options)


def _detect_kind(spec: str | os.PathLike[str]) -> str:
    path = _absolute(spec)
    if os.path.isdir(path):
        return "folder"
    if path.lower().endswith(".json"):
        return "coco"
    if os.path.exists(path):
        return "list"
    raise ImageSourceError(
        f"image source {path!r} does not exist; expected a folder of images, a COCO .json file "
        "or a text file listing image paths (.txt, .lst). Check the path."
    )


def _options_of(cls: type[ImageSource]) -> list[str]:
    return list(inspect.signature(cls.__init__).parameters)[2:]  # drop self and the path


def _taken_by_any_kind(option: str) -> bool:
    return any(option in _options_of(cls) for cls in SOURCES.values())


def _check_options(kind: str, cls: type[ImageSource], options: dict[str, Any]) -> None:
    accepted = _options_of(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ImageSourceError(
            f"image source kind {kind!r} does not take option(s) {unknown}; "
            f"it accepts: {', '.join(accepted) or '(none)'}."
        )
