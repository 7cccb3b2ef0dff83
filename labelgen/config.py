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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .errors import ConfigError
from .labeling import LabelerConfig
from .labeling import class_names as labeler_class_names
from .scoring import ScoringConfig

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImagesConfig:
    """How images are read. Part of the run's identity (fingerprinted)."""

    max_pixels: int = 200_000_000  # width*height above this is a `too_large` failure (decompression bombs)
    compute_sha256: bool = True  # store each file's content hash in its record
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # folder sources: which files are images


@dataclass(frozen=True)
class StoreConfig:
    """How results are stored. Part of the run's identity (fingerprinted)."""

    shard_size: int = 256  # images per shard: the unit of commit and of resume (1..100000)
    compress_level: int = 6  # gzip level of shard files (1..9)


@dataclass(frozen=True)
class ExecutionConfig:
    """How the run executes. Not fingerprinted: may change between resumes."""

    workers: int = 1  # process workers (local) or Ray actors; each loads the model once
    device: str = "cpu"  # cpu, cuda (every visible GPU, one per worker in turn), cuda:N
    threads_per_worker: int = 0  # torch CPU threads per worker; 0 = cores // workers
    backend: Literal["local", "ray"] = "local"  # local: this machine (joblib loky); ray: Ray actors
    ray_address: str = ""  # ray backend: "" starts a local Ray runtime; "auto", "HOST:PORT", "ray://HOST:10001"
    devices: tuple[str, ...] = ()  # local backend: worker i uses devices[i % len]; overrides `device`
    cache_dir: str = ""  # feature cache (encoder outputs by image content + model); "" = off
    cache_max_gb: float = 50.0  # feature cache size bound (least recently used entries are evicted)
    batch_size: int = 1  # images per image-encoder call (CLIP, SAM); halved automatically on out-of-memory


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
        _check_range("store.shard_size", self.store.shard_size, 1, 100_000)
        _check_range("store.compress_level", self.store.compress_level, 1, 9)
        _check_range("execution.workers", self.execution.workers, 1, 1024)
        _check_range("execution.batch_size", self.execution.batch_size, 1, 4096)
        _check_range("images.max_pixels", self.images.max_pixels, 1, 10**12)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready mapping; ``recipe_from_dict`` of it gives an equal recipe."""
        params = self.generator.params
        gen = {"name": self.generator.name, **(config_to_dict(params) if params is not None else {})}
        return _plain(
            {
                "description": self.description,
                "generator": gen,
                "images": config_to_dict(self.images),
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
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.path=value`` overrides, validate strictly."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}. Pass a YAML file, e.g. recipes/zip-paper.yaml") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level; got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides), source=str(path))


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects dotted.key=value; got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def recipe_from_dict(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw mapping into a ``Recipe``; errors name the dotted key."""
    from .generators import GENERATORS  # late: generators register on import

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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string; got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a bug in a Config class


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: expected {low}..{high}; got {value}")


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
