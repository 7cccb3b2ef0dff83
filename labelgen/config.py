"""Typed, frozen configuration loaded strictly from YAML recipes.

A recipe looks like::

    description: one line saying what this recipe is for
    generator:
      name: zip            # a registered generator; the other keys are its own config
      ...
    images:   {max_pixels: 200000000, compute_sha256: true}
    store:    {shard_size: 256}
    execution: {workers: 1, device: cpu}

Unknown keys are errors that name the nearest valid key. ``--set a.b=value``
overrides are applied to the raw mapping before validation; values are parsed
as YAML scalars/lists (``--set generator.vocabulary=[cat,dog]``).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .checks import FieldValueError, bounded, check_fields, one_of
from .errors import ConfigError
from .labelers.config import LabelerConfig
from .labelers.config import class_names as labeler_class_names
from .structures.scoring import ScoringConfig

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")  # what ``execution.device`` / ``devices`` may be


@dataclass(frozen=True)
class TilingConfig:
    """Tiled generation of large images (``docs/tiling.md``). Part of ``images``, so fingerprinted;
    left out of the recipe's dict (and fingerprint) while it equals the default, so runs made before
    tiling existed keep their fingerprint."""

    mode: Literal["never", "auto", "always"] = one_of("never", ("never", "auto", "always"))  # never: whole
    # images; auto: tile images wider or taller than tile_size; always: tile every image
    tile_size: int = bounded(1024, 64, 16384)  # tile side in pixels (tiles at the right/bottom edge are full size too)
    overlap: int = bounded(128, 1, 8192)  # pixels two neighbouring tiles share at least (< tile_size / 2);
    # parts of one object are matched in this shared band
    global_pass: bool = False  # also run the generator on the whole image shrunk to global_size
    global_size: int = bounded(1024, 64, 16384)  # long side of the global view (integer shrink factor)
    global_min_side: int = bounded(0, 0, 10**6)  # objects with a box side >= this (full-frame px) come from
    # the global view, smaller ones from tiles; 0 = tile_size // 2
    seam_ios: float = bounded(0.5, 0.0, 1.0, low_open=True)  # merge two parts when, inside their tiles'
    # shared region, their overlap / the smaller one's area there >= this
    nms_iou: float = bounded(0.5, 0.0, 1.0)  # after merging: drop an instance whose IoU with a better one
    # from another tile is > this
    nms_ios: float = bounded(0.8, 0.0, 1.0)  # ... or a seam-cut part lying inside another instance by more than this
    max_score_columns: tuple[str, ...] = ("clip_class_prob",)  # merged parts take the max of these
    # score columns (presence-like); every other column is the area-weighted mean
    max_pixels: int = bounded(2_500_000_000, 1, 10**12)  # with tiling on: the `too_large` limit instead of
    # images.max_pixels (legitimately huge images; TIFFs are read region by region)

    def __post_init__(self) -> None:
        check_fields(self)
        if 2 * self.overlap >= self.tile_size:
            raise FieldValueError("overlap", f"expected less than half of tile_size ({self.tile_size}); "
                                             f"got {self.overlap}")
        for name in self.max_score_columns:
            if not isinstance(name, str) or not name:
                raise FieldValueError("max_score_columns", f"expected score column names; got {name!r}")


@dataclass(frozen=True)
class ImagesConfig:
    """How images are read. Part of the run's identity (fingerprinted)."""

    max_pixels: int = bounded(200_000_000, 1, 10**12)  # width*height above this is a `too_large` failure
    # (decompression bombs)
    compute_sha256: bool = True  # store each file's content hash in its record
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # folder sources: which files are images
    tiling: TilingConfig = field(default_factory=TilingConfig)  # tiled generation of large images

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.tiling, TilingConfig):
            raise FieldValueError("tiling", f"expected a TilingConfig; got {type(self.tiling).__name__}")


@dataclass(frozen=True)
class StoreConfig:
    """How results are stored. Part of the run's identity (fingerprinted)."""

    shard_size: int = bounded(256, 1, 100_000)  # images per shard: the unit of commit and of resume
    compress_level: int = bounded(6, 1, 9)  # gzip level of shard files

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ExecutionConfig:
    """How the run executes. Not fingerprinted: may change between resumes."""

    workers: int = bounded(1, 1, 1024)  # process workers (local) or Ray actors; each loads the model once
    device: str = "cpu"  # cpu, cuda (every visible GPU, one per worker in turn), cuda:N
    threads_per_worker: int = bounded(0, 0, 4096)  # torch CPU threads per worker; 0 = cores // workers
    backend: Literal["local", "ray"] = one_of("local", ("local", "ray"))  # local: this machine (joblib loky);
    # ray: Ray actors
    ray_address: str = ""  # ray backend: "" starts a local Ray runtime; "auto", "HOST:PORT", "ray://HOST:10001"
    devices: tuple[str, ...] = ()  # local backend: worker i uses devices[i % len]; overrides `device`
    cache_dir: str = ""  # feature cache (encoder outputs by image content + model); "" = off
    cache_max_gb: float = bounded(50.0, 0, 1_000_000, low_open=True)  # feature cache size bound (least
    # recently used entries are evicted)
    batch_size: int = bounded(1, 1, 4096)  # images per image-encoder call (CLIP, SAM); halved on out-of-memory
    compile: bool = False  # torch.compile the encoders' blocks (models/compile.py): slower start, faster long runs

    def __post_init__(self) -> None:
        check_fields(self)
        for name, values in (("device", (self.device,)), ("devices", self.devices)):
            for value in values:
                if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
                    raise FieldValueError(name, f"expected cpu, cuda or cuda:N (N = a GPU index); got {value!r}")


@dataclass(frozen=True)
class GeneratorConfig:
    """``name`` picks the generator; ``params`` is that generator's own frozen config."""

    name: str
    params: Any = None


@dataclass(frozen=True)
class Recipe:
    generator: GeneratorConfig
    images: ImagesConfig = field(default_factory=ImagesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    labeler: LabelerConfig | None = None  # name every instance with CLIP and a vocabulary (after generation)
    scoring: ScoringConfig | None = None  # recompute `confidence` from score columns (after labelling)
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("images", "store", "execution"):  # each section checks its own values when built
            expected = {"images": ImagesConfig, "store": StoreConfig, "execution": ExecutionConfig}[name]
            if not isinstance(getattr(self, name), expected):
                raise ConfigError(f"{name}: expected a {expected.__name__}; got {type(getattr(self, name)).__name__}")
        if not isinstance(self.description, str):
            raise ConfigError(f"description: expected a string; got {type(self.description).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready mapping; ``recipe_from_dict`` of it gives an equal recipe."""
        params = self.generator.params
        gen = {"name": self.generator.name, **(config_to_dict(params) if params is not None else {})}
        return _plain(
            {
                "description": self.description,
                "generator": gen,
                "images": _images_dict(self.images),
                "store": config_to_dict(self.store),
                "execution": config_to_dict(self.execution),
                "labeler": config_to_dict(self.labeler),
                "scoring": config_to_dict(self.scoring),
            }
        )

    def identity(self) -> dict[str, Any]:
        """The part of the config that determines outputs (execution excluded)."""
        data = self.to_dict()
        return {k: data[k] for k in IDENTITY_SECTIONS}

    def class_names(self) -> tuple[str, ...] | None:
        """What ``class_ids`` of this recipe's results index into (``None`` = class-agnostic)."""
        if self.labeler is not None:
            return labeler_class_names(self.labeler)
        from .generators import GENERATORS

        return GENERATORS.get(self.generator.name).vocabulary(self.generator.params)

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of ``identity()``."""
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()


def _images_dict(images: ImagesConfig) -> dict[str, Any]:
    """``images`` as a dict; ``tiling`` left out while it is the default, so the fingerprints of runs
    made before tiling existed do not change (a non-default ``tiling`` is part of the identity)."""
    data = config_to_dict(images)
    if images.tiling == TilingConfig():
        del data["tiling"]
    return data


def config_to_dict(config: Any) -> Any:
    """A frozen config dataclass as plain dicts/lists (mapping fields included)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config


IDENTITY_SECTIONS = ("generator", "images", "store", "labeler", "scoring")


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# -- loading ---------------------------------------------------------------------------
MAX_YAML_BYTES = 4 * 2**20  # a recipe or filter file is a few KB; refuse anything past this
MAX_YAML_VALUES = 100_000  # values (mappings, lists, scalars) after every alias is expanded
MAX_YAML_CHARS = 8 * 2**20  # characters of scalar text after every alias is expanded
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """Raised inside the loader for YAML that is valid but that labelgen refuses; becomes a ConfigError."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with two differences: dates and timestamps load as the plain strings they
    are written as (``2024-01-01`` stays ``"2024-01-01"``), and a key given twice in one mapping is
    an error instead of the last one silently winning. Use it through ``load_yaml``, which also
    bounds the size of the document once its aliases are expanded."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # `<<: *base` merges; keys written next to it override, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable key: the base class reports it
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _Refused(f"key {key!r} appears twice at line {line} (first at line {first});"
                                   " delete one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_constructor(_TIMESTAMP_TAG, yaml.constructor.SafeConstructor.construct_yaml_str)  # !!timestamp


def load_yaml(text: str, source: str, what: str = "recipe") -> Any:
    """Parse one YAML document the way ``yaml.safe_load`` does, with ``StrictLoader``'s two
    differences, refusing documents whose expanded size passes ``MAX_YAML_VALUES`` values or
    ``MAX_YAML_CHARS`` characters ("billion laughs") or that contain themselves (``&a [*a]``).
    Every problem is a one-line ``ConfigError`` naming ``what`` and ``source``."""
    try:
        return _load_yaml_text(text)
    except _Refused as exc:
        raise ConfigError(f"{what} {source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {source} is not valid YAML: {_yaml_error_line(exc)}") from None


def _load_yaml_text(text: str) -> Any:
    loader = StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expanded_size(node)
            return loader.construct_document(node)
        except RecursionError:
            raise _Refused("is nested too deeply (hundreds of levels); a recipe is a few levels deep") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values and scalar characters of the document as if every alias were copied out,
    without copying: each node is counted once and its total reused wherever an alias points to it.
    A node reached again while its own children are being counted is a recursive alias."""
    totals: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) of its expansion
    open_nodes: set[int] = set()  # nodes whose children are being counted (the current path)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            values = 1 + sum(totals[id(c)][0] for c in children)
            chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(totals[id(c)][1] for c in children)
            if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
                raise _Refused(
                    f"expands to more than {MAX_YAML_VALUES} values or {MAX_YAML_CHARS // 2**20} MiB of text once its"
                    f" aliases are expanded (anchors nested inside anchors near line {node.start_mark.line + 1},"
                    " a 'billion laughs' document); a recipe needs far fewer: write the values out")
            totals[key] = (values, chars)
            continue
        if key in totals:
            continue
        if key in open_nodes:
            raise _Refused(f"the anchor at line {node.start_mark.line + 1} is used inside its own value (a recursive"
                           " alias such as `&a [*a]`); a value cannot contain itself: write it out instead")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(children))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(p for p in (exc.context, exc.problem) if p) or type(exc).__name__
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{what}{where}. Fix the YAML syntax there"
    return " ".join(str(exc).split())


def read_yaml_file(path: str | Path, what: str = "recipe", missing_hint: str = "") -> Any:
    """The YAML document of file ``path`` through ``load_yaml``: UTF-8 text, at most ``MAX_YAML_BYTES``.

    Errors are ``ConfigError``s naming ``what`` and the file (``missing_hint`` follows "not found").
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}.{' ' + missing_hint if missing_hint else ''}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_YAML_BYTES // 2**20} MiB; a {what} is a few KB of"
                          " YAML: is this the right file?")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line},"
                          f" byte offset {exc.start}); save it as UTF-8") from None
    return load_yaml(text, str(path), what)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.path=value`` overrides, validate strictly."""
    data = read_yaml_file(path, "recipe", "Pass a YAML file, e.g. recipes/zip-paper.yaml")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level; got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides), source=str(path))


# -- shipped recipes (package data; recipes/ at the repository root links to this folder) -----------
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with labelgen: ``{name: path}`` sorted by name (``zip-cpu`` for ``zip-cpu.yaml``)."""
    return dict(sorted((path.stem, path) for path in SHIPPED_RECIPES.glob("*.yaml")))


def recipe_summary(path: str | Path) -> str:
    """The first line of a recipe's ``description`` ("" when it has none)."""
    data = read_yaml_file(path)
    description = data.get("description") if isinstance(data, dict) else None
    lines = str(description).strip().splitlines() if description is not None else []
    return lines[0].strip() if lines else ""


def find_recipe(name: str | Path) -> Path:
    """The recipe file that ``labelgen run NAME`` means.

    An existing path wins; anything else with a folder in it, or another suffix than ``.yaml``, stays a
    path (``load_recipe`` says it is not found). A bare name, with or without ``.yaml``, is looked for
    in ``./recipes/``, then among the shipped recipes; an unknown one is a ``ConfigError`` that lists
    the shipped names and suggests the nearest.
    """
    path = Path(name)
    if path.exists() or path.parent != Path(".") or path.suffix not in ("", ".yaml"):
        return path
    stem = path.stem if path.suffix else path.name
    local = Path("recipes") / f"{stem}.yaml"
    if local.is_file():
        return local
    shipped = shipped_recipes()
    if stem in shipped:
        return shipped[stem]
    close = difflib.get_close_matches(stem, list(shipped), n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"recipe file not found: {name}, and no shipped recipe is named {stem!r}.{suggestion}"
                      f" Shipped: {', '.join(shipped) or 'none'} (`labelgen recipes` describes them);"
                      " or pass a YAML file, e.g. recipes/zip-paper.yaml")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``a.b.c=value`` applied (value parsed as YAML).

    The copy holds plain dicts, lists, strings, numbers, booleans and ``None`` only; anything
    else (bytes, sets, a structure that contains itself) is a ``ConfigError`` naming its key.
    """
    result = plain_copy(data, "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects dotted.key=value; got {item!r}")
        try:
            value = plain_copy(_load_yaml_text(raw), key.strip()) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except _Refused as exc:
            raise ConfigError(f"--set {key.strip()}: the value {exc}") from None
        node = result
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def plain_copy(value: Any, where: str) -> Any:
    """A copy of ``value`` made of dicts (string keys, as JSON has), lists and JSON scalars."""
    try:
        return _plain_copy(value, where)
    except RecursionError:
        raise ConfigError(f"{where or 'recipe'}: nested too deeply or contains itself; write the values out") from None


def _plain_copy(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {_plain_key(k, where): _plain_copy(v, _join(where, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ConfigError(f"{where or 'recipe'}: expected a string, a number, true/false, a list or a mapping;"
                      f" got {type(value).__name__} {shown}")


def _plain_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)  # what JSON makes of such a key (1 -> "1", true -> "true")
    raise ConfigError(f"{where or 'recipe'}: mapping keys must be strings or numbers; got {type(key).__name__} {key!r}")


def recipe_from_dict(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw mapping into a ``Recipe``; errors name the dotted key."""
    from .generators import GENERATORS

    data = dict(data)
    raw_gen = data.pop("generator", None)
    if not isinstance(raw_gen, dict) or "name" not in raw_gen:
        raise ConfigError(f"{source}: 'generator' must be a mapping with a 'name' (one of {GENERATORS.names()})")
    raw_gen = dict(raw_gen)
    name = raw_gen.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"generator.name: expected str; got {type(name).__name__}")
    try:
        generator_cls = GENERATORS.get(name)
    except Exception as exc:
        raise ConfigError(f"generator.name: {exc}") from None
    params = from_mapping(generator_cls.Config, raw_gen, "generator")
    rest = from_mapping(_RecipeRest, data, "")
    return Recipe(generator=GeneratorConfig(name, params), **{f.name: getattr(rest, f.name) for f in dataclasses.fields(rest)})


@dataclass(frozen=True)
class _RecipeRest:
    images: ImagesConfig = field(default_factory=ImagesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    labeler: LabelerConfig | None = None
    scoring: ScoringConfig | None = None
    description: str = ""


def from_mapping(cls: type, data: Any, path: str) -> Any:
    """Build frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    where = path or "recipe"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping; got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), path))
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except FieldValueError as exc:  # a value out of its range: name the dotted recipe key
        raise ConfigError(f"{_join(path, exc.field)}: {exc.detail}") from None
    except TypeError as exc:  # a required field was missing
        raise ConfigError(f"{where}: {exc}") from None


def _unknown_key_message(key: str, valid: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {_join(path, close[0])!r}?" if close else ""
    return f"unknown key {_join(path, key)!r}.{hint} Valid keys here: {', '.join(sorted(valid))}"


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: no type of {tp} accepts {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}; got {value!r}")
        return value
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping; got {type(value).__name__} {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return types.MappingProxyType({
            _coerce(key_type, k, f"{path} key"): _coerce(value_type, v, f"{path}.{k}") for k, v in value.items()
        })
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list; got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            return tuple(_coerce(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values; got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return _coerce_scalar(tp, value, path)


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer; got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number; got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string; got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a bug in a Config class


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Readable lines ``key: old -> new`` for every differing leaf of two nested mappings."""
    lines = []
    for key in sorted(set(old) | set(new)):
        path = _join(prefix, key)
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines.extend(config_diff(a, b, path))
        elif a != b:
            lines.append(f"  {path}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines
