"""Parity of labelgen's Zip stages 1-3 (``fidelity: release``) with the authors' release, on the same weights.

The release (``ChengShiest/Zip-Your-CLIP``: ``zip_utils.py``, which imports ``xmed-lab/CLIP_Surgery`` as
``CLIP_Surgery``) is public but not part of labelgen: give the path of YOUR copy. Its own code runs
(``zip_utils.inference_on_one_image``); the harness only captures the boxes it draws (``show_box``), so
nothing of the release is restated here. labelgen runs its stages 1-3 with ``fidelity: release`` and the
two deliberate fixes switched back (``token_normalisation: tokens``, ``positional_embedding: mutate``;
``--keep-fixes`` keeps them). Per image and class it prints the boxes of each side, how many are the
same grid box (each side's image boxes mapped back to cells with its own factors: the release swaps
the x and y factors, labelgen does not, which moves a box near the far edge of a 640-px image by up to
~2.5 px), and how many image boxes match one to one at IoU >= ``--iou`` (0.9). Exit status 0 when every
box is the same grid box.

    python bench/parity_release.py --release ~/src/Zip-Your-CLIP --images IMG_OR_FOLDER [...] \\
        --classes person,object [--weights openai | --weights random --seed 0] [--device cuda]

Layout expected: ``RELEASE/zip_utils.py`` and ``RELEASE/CLIP_Surgery/clip/`` (the release's README
clones CLIP_Surgery there; ``--clip-surgery DIR`` names the folder that contains ``CLIP_Surgery``
otherwise). ``--weights openai``: the official files, found by both sides in ``~/.cache/clip``
(``ViT-B-16.pt``, ``RN50x64.pt``; the release downloads them, labelgen with ``allow_download``).
``--weights random``: seeded random OpenAI-format state dicts of the same architectures, written to a
temporary folder and loaded by both (labelgen through the ``-quickgelu`` configs, as OpenAI weights
are). The paper's settings (short side 2048, k 20, RN50x64) cost ~12 TFLOPs per image: use a GPU, or
``--short-side 512 --boundary-model RN50`` for a quick look (the release's 2048 transform is replaced,
and said so). On a GPU the release's boxes can differ from a CPU run of either side (kernel order);
compare on one device. The release hard-codes k = 20 and the 100-cell minimum.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIT, VIT_RELEASE = "ViT-B-16", "CS-ViT-B/16"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", required=True, type=Path, help="your copy of ChengShiest/Zip-Your-CLIP")
    parser.add_argument("--clip-surgery", type=Path, default=None,
                        help="folder containing the CLIP_Surgery package (default: --release)")
    parser.add_argument("--images", required=True, nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--classes", default="object", help="comma-separated class names, each run on its own")
    parser.add_argument("--weights", choices=("openai", "random"), default="openai")
    parser.add_argument("--seed", type=int, default=0, help="--weights random: torch seed of the weights")
    parser.add_argument("--boundary-model", default="RN50x64", help="CLIP ResNet of stage 2 (RN50x64 in the paper)")
    parser.add_argument("--short-side", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-images", type=int, default=0, help="0 = all")
    parser.add_argument("--iou", type=float, default=0.9)
    parser.add_argument("--fidelity", choices=("release", "fast"), default="release",
                        help="labelgen's generator.fidelity (fast: measure what the faster rules change)")
    parser.add_argument("--keep-fixes", action="store_true",
                        help="keep labelgen's token normalisation along channels (boxes then differ by design)")
    return parser.parse_args(argv)


def image_paths(entries: list[Path], limit: int) -> list[Path]:
    paths: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            paths += sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif entry.is_file():
            paths.append(entry)
        else:
            raise SystemExit(f"not an image or folder: {entry}")
    return paths[:limit] if limit > 0 else paths


# -- the release ---------------------------------------------------------------------------------------
def import_release(release: Path, clip_surgery: Path | None, device: str):
    """``zip_utils`` of the user's copy, with its module-level device and CUDA_VISIBLE_DEVICES neutralised."""
    import torch

    if not (release / "zip_utils.py").is_file():
        raise SystemExit(f"{release} has no zip_utils.py: give your clone of ChengShiest/Zip-Your-CLIP")
    if device.startswith("cuda"):
        torch.cuda.init()  # before zip_utils sets CUDA_VISIBLE_DEVICES='2' at import: it then changes nothing
    saved_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    _shim_pkg_resources()
    import matplotlib

    matplotlib.use("Agg")
    for folder in (clip_surgery or release, release):
        sys.path.insert(0, str(folder))
    import zip_utils  # noqa: E402  (the user's copy)

    if saved_env is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = saved_env
    zip_utils.device = device  # the release hard-codes 'cuda:2'
    return zip_utils


def _shim_pkg_resources() -> None:
    """CLIP_Surgery imports ``pkg_resources.packaging`` for a version check; newer setuptools dropped it."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        module = types.ModuleType("pkg_resources")
        module.packaging = types.SimpleNamespace(version=packaging.version)
        sys.modules["pkg_resources"] = module


def release_models(zip_utils, weights: dict[str, str], boundary_model: str, device: str):
    import torch

    def load(name: str):
        if name not in weights:  # the official file: the release's own clip.load (downloads to ~/.cache/clip)
            return zip_utils.clip.load(VIT_RELEASE if name == VIT else name, device=device)[0]
        # a state dict: what clip.load does with one (its JIT-first read leaves the file at its end, so a
        # plain state dict fails there): the release's build_model, moved to the device, float on the CPU
        from CLIP_Surgery.clip.build_model import build_model

        model = build_model(Path(weights[name]).name, torch.load(weights[name], map_location="cpu",
                                                                 weights_only=True)).to(device)
        return model.float() if str(device) == "cpu" else model

    semantic = load(VIT).eval().to(device)
    rn = load(boundary_model)
    trunk = torch.nn.Sequential(*list(rn.visual.children())[:-2]).float().to(device).eval()  # up to layer3
    return semantic, trunk


def release_boxes(zip_utils, semantic, trunk, path: Path, class_name: str) -> np.ndarray:
    """(N, 4) XYXY boxes the release draws for one image and class (its own code, plots discarded)."""
    import matplotlib.pyplot as plt

    boxes: list[list[float]] = []
    original = zip_utils.show_box
    zip_utils.show_box = lambda box, ax: boxes.append([float(v) for v in box])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            zip_utils.inference_on_one_image(semantic, trunk, str(path), [class_name])
    finally:
        zip_utils.show_box = original
        plt.close("all")
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def set_release_short_side(zip_utils, short_side: int) -> None:
    if short_side == 2048:
        return
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    steps = list(zip_utils.L_ToTensor.transforms)
    steps[0] = Resize(short_side, interpolation=InterpolationMode.BICUBIC)
    zip_utils.L_ToTensor = Compose(steps)
    print(f"note: the release's Resize(2048) transform replaced by Resize({short_side})")
    assert isinstance(steps[-1], Normalize) and any(isinstance(s, ToTensor) for s in steps)


# -- weights -------------------------------------------------------------------------------------------
def random_weights(folder: Path, boundary_model: str, seed: int) -> dict[str, str]:
    """Seeded random OpenAI-format state dicts (QuickGELU architectures) for both sides; name -> file."""
    import open_clip
    import torch

    files = {}
    for name, file_name in ((VIT, "CS-ViT-B-16-random.pt"), (boundary_model, f"{boundary_model}-random.pt")):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"{name}-quickgelu")
        path = folder / file_name  # "CS-" in the name: the release builds its CLIP Surgery model
        torch.save(model.state_dict(), path)
        files[name] = str(path)
        del model
    return files


# -- labelgen ------------------------------------------------------------------------------------------
def labelgen_stages(weights: dict[str, str], args: argparse.Namespace):
    import torch

    from labelgen.generators.zip.boundary import BoundaryStage
    from labelgen.generators.zip.config import BoundaryConfig, DiscoveryConfig, SemanticConfig, ZipConfig
    from labelgen.generators.zip.generator import ZipGenerator
    from labelgen.generators.zip.semantic import SemanticStage
    from labelgen.models.loading import load_clip

    device = torch.device(args.device)

    def model(name: str):
        if name in weights:  # a local OpenAI-format file: the -quickgelu config says what it was trained as
            return load_clip(f"{name}-quickgelu", weights[name], random_weights=False, allow_download=False,
                             device=device)
        return load_clip(name, "openai", random_weights=False, allow_download=True, device=device)

    fixes = {} if args.keep_fixes else {"token_normalisation": "tokens", "positional_embedding": "mutate"}
    config = ZipConfig(
        semantic=SemanticConfig(class_threshold=0.0, top_k=0, class_agnostic=False, **fixes),
        boundary=BoundaryConfig(model=args.boundary_model, short_side=args.short_side, num_clusters=20),
        discovery=DiscoveryConfig(cluster_visits="most_common" if args.fidelity == "release" else "all"),
        fidelity=args.fidelity)
    vit, tokenizer, _ = model(VIT)
    rn, _, _ = model(args.boundary_model)
    boundary = BoundaryStage(rn, config.boundary, device=device, fidelity=args.fidelity)
    del rn
    return config, vit, tokenizer, boundary, ZipGenerator, SemanticStage


def labelgen_boxes(parts, image_rgb: np.ndarray, class_name: str) -> tuple[np.ndarray, tuple[int, int], int]:
    """labelgen's (N, 4) XYXY image-pixel boxes, its (grid_height, grid_width) and k-means iterations."""
    import dataclasses

    config, vit, tokenizer, boundary, generator_class, semantic_class = parts
    semantic_config = dataclasses.replace(config.semantic, vocabulary=(class_name,))
    config = dataclasses.replace(config, semantic=semantic_config)
    semantic = semantic_class(vit, tokenizer, semantic_config, device=boundary.device, fidelity=config.fidelity)
    generator = generator_class(config, semantic, boundary, None, {})
    height, width = image_rgb.shape[:2]
    result = semantic(image_rgb)
    clusters = boundary(image_rgb)
    boxes = generator.propose(result, clusters, height, width).boxes_xyxy.astype(np.float64)
    return boxes, (clusters.grid_height, clusters.grid_width), clusters.iterations


def to_grid(boxes_xyxy: np.ndarray, x_scale: float, y_scale: float) -> set[tuple[int, ...]]:
    """Image-pixel boxes back to grid cells (each side with the factors it scaled by)."""
    cells = np.rint(boxes_xyxy / np.array([x_scale, y_scale, x_scale, y_scale]))
    return {tuple(int(v) for v in box) for box in cells}


# -- comparison ----------------------------------------------------------------------------------------
def matched(boxes_a: np.ndarray, boxes_b: np.ndarray, threshold: float) -> int:
    """Boxes matched one to one (optimal assignment) with IoU >= ``threshold``."""
    if not len(boxes_a) or not len(boxes_b):
        return 0
    from scipy.optimize import linear_sum_assignment

    a, b = boxes_a[:, None], boxes_b[None]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
             - inter)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    rows, cols = linear_sum_assignment(-iou)
    return int((iou[rows, cols] >= threshold).sum())


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    args = parse_args(argv)
    classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    paths = image_paths(args.images, args.max_images)
    zip_utils = import_release(args.release.expanduser(), args.clip_surgery, args.device)
    set_release_short_side(zip_utils, args.short_side)
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_weights(Path(tmp), args.boundary_model, args.seed) if args.weights == "random" else {}
        semantic, trunk = release_models(zip_utils, weights, args.boundary_model, args.device)
        parts = labelgen_stages(weights, args)
    print(f"weights {args.weights}{'' if args.weights == 'openai' else f' (seed {args.seed})'}, "
          f"{args.boundary_model} @ {args.short_side}, k 20, device {args.device}, IoU >= {args.iou}, "
          f"labelgen fidelity {args.fidelity}{', fixes kept' if args.keep_fixes else ''}")
    print("same cells: grid boxes equal, each side's image boxes mapped back to cells with its own factors (the")
    print("release scales x by H/h and y by W/w, labelgen x by W/w and y by H/h); matched: image boxes, IoU")
    print(f"{'image':<28} {'class':<12} {'release':>7} {'labelgen':>8} {'same cells':>10} {'matched':>7} {'kmeans it':>9}")
    totals = np.zeros(4, np.int64)
    for path in paths:
        image_rgb = np.asarray(Image.open(path).convert("RGB"))  # as the release reads it (no EXIF turn)
        for name in classes:
            theirs = release_boxes(zip_utils, semantic, trunk, path, name)
            ours, (grid_height, grid_width), iterations = labelgen_boxes(parts, image_rgb, name)
            height, width = image_rgb.shape[:2]
            same = len(to_grid(theirs, height / grid_height, width / grid_width)
                       & to_grid(ours, width / grid_width, height / grid_height))
            hits = matched(theirs, ours, args.iou)
            totals += (len(theirs), len(ours), same, hits)
            print(f"{path.name:<28} {name:<12} {len(theirs):>7} {len(ours):>8} {same:>10} {hits:>7} {iterations:>9}",
                  flush=True)
    print(f"{'total':<41} {totals[0]:>7} {totals[1]:>8} {totals[2]:>10} {totals[3]:>7}")
    return 0 if totals[0] == totals[1] == totals[2] else 1


if __name__ == "__main__":
    raise SystemExit(main())
