"""Finding model weights: open_clip pretrained tags, SAM checkpoints, or local files.

Nothing here downloads silently into odd places or waits on a dead network:
a cache lookup comes first, a download is tried only when allowed and the host
resolves, and every failure is a ``WeightsNotFoundError`` that names the missing
file and how to supply it. Imports no torch.
"""
from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from ..atomic import sha256_file
from ..errors import WeightsNotFoundError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class SamCheckpoint:
    model_type: str
    url: str
    sha256: str | None  # None: no published hash (the check is skipped with a logged warning)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The official Segment Anything checkpoints (segment-anything README) and their SHA-256.
SAM_CHECKPOINTS = {
    c.model_type: c
    for c in (
        SamCheckpoint("vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                      "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        SamCheckpoint("vit_l", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                      "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        SamCheckpoint("vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                      "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    )
}


# The official SAM 2.1 checkpoints (sam2 README, checkpoints/download_ckpts.sh; Apache-2.0). Each file holds
# {"model": state_dict}. No SHA-256 was found in public material (sam2 README, issues, model-zoo listings) at the
# time of writing, so none is invented here: sha256 None skips the hash check with a logged warning.
SAM2_CHECKPOINTS = {
    c.model_type: c
    for c in (
        SamCheckpoint(f"sam2.1_hiera_{size}",
                      f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt", None)
        for size in ("tiny", "small", "base_plus", "large")
    )
}


def check_all(checks: Iterable[Callable[[], Any]]) -> None:
    """Run every weights check; raise one ``WeightsNotFoundError`` naming every missing file.

    Each check is a callable that resolves some weights (or runs another ``check_all``); the
    ``WeightsNotFoundError`` of each is kept and the next check still runs, so a machine without
    weights learns everything it needs in one attempt. One missing file raises its own error as
    is; several raise one error whose message lists each (what is missing and how to supply it)
    and whose ``missing`` attribute holds the individual errors. Weights needed by two recipe keys
    (the same CLIP for stage 1 and the labeler) are named once. Any other error propagates at once.
    """
    missing: dict[str, WeightsNotFoundError] = {}
    also: dict[str, list[str]] = {}
    for check in checks:
        try:
            check()
        except WeightsNotFoundError as exc:
            for error in getattr(exc, "missing", None) or [exc]:
                key = getattr(error, "weights_id", None) or str(error)
                if key not in missing:
                    missing[key], also[key] = error, []
                elif getattr(error, "config_key", None):
                    also[key].append(error.config_key)
    errors = [_with_also(missing[key], also[key]) for key in missing]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        items = " ".join(f"({i}) {error}" for i, error in enumerate(errors, 1))
        combined = WeightsNotFoundError(f"{len(errors)} weight files are missing; supply each before running: {items}")
        combined.missing = tuple(errors)
        raise combined


def _with_also(error: WeightsNotFoundError, keys: list[str]) -> WeightsNotFoundError:
    if not keys:
        return error
    noted = WeightsNotFoundError(f"{error} (also needed by {', '.join(keys)})")
    noted.weights_id, noted.config_key = getattr(error, "weights_id", None), getattr(error, "config_key", None)
    return noted


def _identified(exc: WeightsNotFoundError, weights_id: str, config_key: str) -> WeightsNotFoundError:
    """``exc`` marked with what file it is about and which recipe key supplies it (for ``check_all``)."""
    exc.weights_id, exc.config_key = weights_id, config_key
    return exc


def cache_dir() -> Path:
    """``$LABELGEN_CACHE`` or ``~/.cache/labelgen``."""
    return Path(os.environ.get("LABELGEN_CACHE") or Path.home() / ".cache" / "labelgen")


def looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or "/" in value or os.sep in value


def resolve_sam_checkpoint(model_type: str, checkpoint: str = "", *, allow_download: bool = True,
                           config_key: str = "generator.sam.checkpoint") -> Path:
    """Path of a SAM checkpoint: ``checkpoint`` if given, else the official file in the cache.

    The official file is downloaded into ``cache_dir()/sam`` when allowed and reachable,
    and its SHA-256 is checked either way. ``config_key`` is the recipe key named in errors.
    """
    try:
        return _resolve_sam_checkpoint(model_type, checkpoint, allow_download, config_key)
    except WeightsNotFoundError as exc:
        raise _identified(exc, f"sam {model_type} {checkpoint}", config_key)


def _resolve_sam_checkpoint(model_type: str, checkpoint: str, allow_download: bool, config_key: str) -> Path:
    if model_type not in SAM_CHECKPOINTS:
        raise WeightsNotFoundError(f"unknown SAM model type {model_type!r}; expected one of {sorted(SAM_CHECKPOINTS)}")
    if checkpoint:
        return _existing_file(checkpoint, f"SAM {model_type} checkpoint", config_key)
    return _official_file(SAM_CHECKPOINTS[model_type], cache_dir() / "sam", f"SAM {model_type} checkpoint",
                          allow_download, config_key)


def resolve_sam2_checkpoint(model_type: str, checkpoint: str = "", *, allow_download: bool = True,
                            config_key: str = "generator.sam.checkpoint") -> Path:
    """Path of a SAM 2.1 checkpoint (``sam2.1_hiera_tiny`` ... ``sam2.1_hiera_large``): ``checkpoint`` if
    given, else the official file in ``cache_dir()/sam2``, downloaded there when allowed and reachable.
    ``config_key`` is the recipe key named in errors."""
    try:
        if model_type not in SAM2_CHECKPOINTS:
            raise WeightsNotFoundError(
                f"unknown SAM 2.1 model type {model_type!r}; expected one of {sorted(SAM2_CHECKPOINTS)}")
        if checkpoint:
            return _existing_file(checkpoint, f"SAM 2.1 {model_type} checkpoint", config_key)
        return _official_file(SAM2_CHECKPOINTS[model_type], cache_dir() / "sam2", f"SAM 2.1 {model_type} checkpoint",
                              allow_download, config_key)
    except WeightsNotFoundError as exc:
        raise _identified(exc, f"sam2 {model_type} {checkpoint}", config_key)


def _official_file(official: SamCheckpoint, folder: Path, what: str, allow_download: bool, config_key: str) -> Path:
    """``folder/<official file name>``: checked when cached, else downloaded when allowed and reachable."""
    target = folder / official.filename
    if target.is_file():
        _check_sha256(target, official.sha256)
        return target
    how = (f"download {official.url} on a machine with internet and put it at {target}, or set"
           f" {config_key}=/path/to/{official.filename}")
    if not allow_download:
        raise WeightsNotFoundError(f"{what} not found at {target} (downloads disabled); {how}")
    _download(official.url, target, official.sha256, how)
    return target


# SAM 3 (facebookresearch/sam3; code and weights under Meta's "SAM License"). The checkpoint is gated on
# Hugging Face: request access at SAM3_HF_PAGE, then download SAM3_CHECKPOINT_NAME. Never downloaded here.
SAM3_HF_PAGE = "https://huggingface.co/facebook/sam3"
SAM3_CHECKPOINT_NAME = "sam3.pt"


def resolve_sam3_checkpoint(checkpoint: str = "", *, config_key: str = "generator.checkpoint") -> Path:
    """Path of the SAM 3 checkpoint: ``checkpoint`` if given, else ``cache_dir()/sam3/sam3.pt``.

    Local files only: the official file is gated (licence acceptance on Hugging Face), so a missing
    file is a ``WeightsNotFoundError`` saying where to request it and where to put it.
    """
    try:
        if checkpoint:
            return _existing_file(checkpoint, "SAM 3 checkpoint", config_key)
        target = cache_dir() / "sam3" / SAM3_CHECKPOINT_NAME
        if target.is_file():
            return target
        raise WeightsNotFoundError(
            f"SAM 3 checkpoint not found at {target}. The weights are gated: request access at {SAM3_HF_PAGE}"
            f" (SAM License), download {SAM3_CHECKPOINT_NAME} from there and put it at {target}, or set"
            f" {config_key}=/path/to/{SAM3_CHECKPOINT_NAME}"
        )
    except WeightsNotFoundError as exc:
        raise _identified(exc, f"sam3 {checkpoint}", config_key)


def resolve_clip_weights(model_name: str, pretrained: str, *, allow_download: bool = True,
                         config_key: str = "the recipe's pretrained field") -> Path:
    """Path of open_clip weights for ``model_name``: a local file, or a pretrained tag
    (e.g. ``openai``) looked up in open_clip's normal caches, downloaded when allowed.
    ``config_key`` is the recipe key named in errors (e.g. ``generator.semantic.pretrained``)."""
    try:
        return _resolve_clip_weights(model_name, pretrained, allow_download, config_key)
    except WeightsNotFoundError as exc:
        raise _identified(exc, f"clip {model_name} {pretrained}", config_key)


def _resolve_clip_weights(model_name: str, pretrained: str, allow_download: bool, config_key: str) -> Path:
    if looks_like_path(pretrained):
        return _existing_file(pretrained, f"CLIP {model_name} weights", config_key)
    import open_clip  # lazy: heavy

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsNotFoundError(f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}; known tags: {tags}")
    cached = _clip_cached_file(cfg)
    if cached is not None:
        return cached
    where = cfg.get("hf_hub") or cfg.get("url")
    how = (f"fetch it on a machine with internet (open_clip.create_model({model_name!r}, pretrained={pretrained!r})"
           f" fills the same cache; source: {where}) and copy the cache (~/.cache/huggingface), or set"
           f" {config_key} to a local .pt/.bin/.safetensors file")
    host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or ""
    if not allow_download or not _resolves(host):
        raise WeightsNotFoundError(f"CLIP weights {model_name}/{pretrained} are not cached and {host} is not reachable; {how}")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as exc:  # network and hub errors come in many types
        raise WeightsNotFoundError(f"could not download CLIP weights {model_name}/{pretrained}: {exc}; {how}") from exc


def _clip_cached_file(cfg: dict) -> Path | None:
    hub = cfg.get("hf_hub") or ""
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # "org/repo/" or "org/repo/file.bin"
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url") or ""
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _existing_file(value: str, what: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} not found: {path} does not exist. Fix {key} or copy the file there.")
    return path


def _check_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        log.warning("%s: no published SHA-256 to check it against; using it unchecked", path.name)
        return
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsNotFoundError(
            f"{path} is corrupt or not the official file: SHA-256 {actual}, expected {expected}. Delete it and retry."
        )


def _resolves(host: str) -> bool:
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _download(url: str, target: Path, sha256: str | None, how: str) -> None:
    host = urlparse(url).hostname or ""
    if not _resolves(host):
        raise WeightsNotFoundError(f"{target.name} is not cached and {host} is not reachable (offline?); {how}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(1 << 22), b""):
                out.write(block)
        _check_sha256(tmp, sha256)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise WeightsNotFoundError(f"could not download {url}: {exc}; {how}") from exc
