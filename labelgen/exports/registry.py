"""The exporter contract and registry: ``labelgen export --format NAME`` looks NAME up here.

An exporter is a class registered with ``@EXPORTERS.register("name")`` (the decorator sets its
``name``). The CLI builds one with no arguments and calls ``export(source, request)``. Built-in
formats register in ``labelgen.exports.formats``; plugins register theirs the same way and are
loaded with ``--plugin MODULE`` (``labelgen.generators.load_plugins``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from .source import ExportSource


@dataclass(frozen=True)
class ExportRequest:
    """Where an export goes and how, as ``labelgen export`` was asked.

    ``out``: target folder (``--out``), or ``None``; ``dataset``: a dataset name (``--dataset``) for
    exporters that write into a database; ``images_root``: the folder exported file names are
    relative to (``None``: the source's); ``options``: the format options by name
    (``mask_format``, ``polygon_tolerance``, ``task``, ``multipart``, ``images``). An exporter reads
    the options it knows and ignores the others.
    """

    out: Path | None = None
    dataset: str | None = None
    images_root: str | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def option(self, key: str, default: Any = None) -> Any:
        """``options[key]``, or ``default`` when it was not given."""
        return self.options.get(key, default)


class Exporter(abc.ABC):
    """Writes a run's labels in one format.

    Class attributes: ``name`` (set by ``EXPORTERS.register``), ``summary`` (one line for
    ``labelgen exporters``), ``needs_out`` (``True``: the export writes into ``request.out``,
    which ``labelgen export`` then requires).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_out: ClassVar[bool] = True

    @abc.abstractmethod
    def export(self, source: "ExportSource", request: ExportRequest) -> Any:
        """Write ``source``'s labels as ``request`` asks; return the report ``labelgen export``
        prints as JSON (a dataclass or a JSON mapping). Raise ``ExportError`` when it cannot."""


EXPORTERS: Registry[type[Exporter]] = Registry("exporter", named=True)


def export(name: str, source: "ExportSource", request: ExportRequest) -> Any:
    """Export ``source`` with the exporter registered as ``name``; its report.

    Raises ``RegistryError`` for an unknown name, ``ConfigError`` when the format writes a
    folder and ``request.out`` is ``None``.
    """
    exporter = EXPORTERS.get(name)()
    if exporter.needs_out and request.out is None:
        raise ConfigError(f"--format {name} needs --out FOLDER")
    return exporter.export(source, request)
