"""``labelgen`` command line. The only place that prints, draws progress and picks exit codes.

Exit codes: 0 success; 1 finished but some shards crashed (rerun to retry them);
2 a labelgen error (bad input, config mismatch, missing weights...); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import LabelgenError

log = logging.getLogger("labelgen")


_FILTER_FLAGS = [
    ("--min-confidence", "min_confidence", float), ("--confidence-column", "confidence_column", str),
    ("--min-area", "min_area", int), ("--max-area", "max_area", int),
    ("--min-area-fraction", "min_area_fraction", float), ("--max-area-fraction", "max_area_fraction", float),
    ("--nms-iou", "nms_iou", float), ("--nms-ios", "nms_ios", float), ("--max-instances", "max_instances", int),
    ("--border-margin", "border_margin", int), ("--min-component-area", "min_component_area", int),
]


def _add_label_source_options(parser: argparse.ArgumentParser, verb: str, filtering: str) -> None:
    """Which labels a command reads: a saved filtered or reviewed copy, or filter options on the fly."""
    parser.add_argument("--filtered", metavar="NAME", help=f"{verb} RUN_DIR/filtered/NAME (`labelgen filter --save`)")
    parser.add_argument("--reviewed", metavar="NAME", help=f"{verb} RUN_DIR/reviewed/NAME (`labelgen pull`)")
    parser.add_argument("--filter-config", help=f"filter options (YAML), {filtering}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"filter option {filtering}, e.g. --set min_confidence=0.5")


def _add_min_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-precision", type=float, metavar="P",
                        help="keep the largest set of labels whose estimated precision reaches P (needs --calibration)")
    parser.add_argument("--calibration", metavar="NAME", help="calibration RUN_DIR/calibration/NAME (`labelgen calibrate`):"
                        " with --min-precision, what estimates it; alone (export), adds the p_correct score column")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelgen", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"labelgen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug messages, and the model libraries' own INFO messages (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="label a folder / list / COCO JSON of images into a run directory")
    run.add_argument("recipe", help="recipe YAML (e.g. recipes/zip-paper.yaml) or a shipped recipe's name"
                                    " (e.g. zip-cpu; `labelgen recipes` lists them)")
    run.add_argument("--images", required=True, help="image folder, list file (.txt) or COCO JSON")
    run.add_argument("--images-kind", default="auto", choices=["auto", "folder", "list", "coco"],
                     help="what --images is (default auto: a folder, a .txt list of paths, or a COCO .json)")
    run.add_argument("--images-root", help="COCO JSON: folder that file_name is relative to")
    run.add_argument("--out", required=True, help="run directory (created; rerun the same command to resume)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set store.shard_size=128 (repeatable)")
    run.add_argument("--workers", type=int, help="parallel worker processes (default: recipe)")
    run.add_argument("--device", help="cpu, cuda (every GPU, one per worker in turn) or cuda:N (default: recipe)")
    run.add_argument("--backend", choices=["local", "ray"],
                     help="local: processes on this machine; ray: Ray actors (default: recipe, else local)")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="Ray cluster to use: auto, HOST:PORT or ray://HOST:10001 (implies --backend ray;"
                          " default: start a local Ray runtime)")
    run.add_argument("--cache-dir", help="feature cache folder: encoder outputs are reused across runs")
    run.add_argument("--batch-size", type=int,
                     help="images per CLIP/SAM image-encoder call (halved on out-of-memory; default: recipe)")
    run.add_argument("--extend", action="store_true", help="add images new in the source as new shards")
    run.add_argument("--new-run", action="store_true",
                     help="if --out holds a different run, move it to archive/ and start over")
    run.add_argument("--plugin", action="append", default=[], help="import MODULE to register generators")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("recipes", help="list the shipped recipes (labelgen run NAME) with their descriptions")

    status = sub.add_parser("status", help="shards done/pending/failed, images, instances, failures")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--verify", action="store_true", help="re-hash every committed shard file")

    filt = sub.add_parser("filter", help="apply confidence/area/NMS/... filters to a finished run (no model loaded)")
    filt.add_argument("run_dir")
    filt.add_argument("--config", help="filter options YAML (FilterConfig fields, or a `filter:` section)")
    filt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a filter option, e.g. --set nms_ios=0.9 (repeatable)")
    for flag, key, kind in _FILTER_FLAGS:
        filt.add_argument(flag, dest=key, type=kind, help=f"same as --set {key}=VALUE")
    filt.add_argument("--drop-border", action="store_true", help="reject masks touching the image border")
    filt.add_argument("--fill-holes", action="store_true", help="fill holes inside masks before filtering")
    filt.add_argument("--save", metavar="NAME", help="write the kept labels to RUN_DIR/filtered/NAME/")
    filt.add_argument("--sweep", metavar="VALUES",
                      help="report labels kept per min-confidence value: 'start:stop:step' or 'v1,v2,...'")
    filt.add_argument("--sweep-column", default=None, help="score column to sweep (default: the confidence column)")
    filt.add_argument("--json", action="store_true", help="machine-readable output")
    _add_min_precision_options(filt)

    exp = sub.add_parser("export", help="export labels to COCO, YOLO or a FiftyOne dataset")
    exp.add_argument("run_dir")
    exp.add_argument("--format", required=True, metavar="FORMAT", help=_export_formats_help())
    exp.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="import MODULE first to register its exporters")
    exp.add_argument("--out", help="target folder (coco, yolo)")
    exp.add_argument("--dataset", help="FiftyOne dataset name (fiftyone)")
    exp.add_argument("--images-root", help="folder that exported file names are relative to (default: the source's)")
    _add_label_source_options(exp, "export", "applied while exporting")
    exp.add_argument("--mask-format", default="rle", choices=["rle", "polygon"], help="coco: segmentation format")
    exp.add_argument("--polygon-tolerance", type=float, default=0.9, help="coco polygons: minimum IoU per object")
    exp.add_argument("--task", default="segment", choices=["segment", "detect"], help="yolo: label type")
    exp.add_argument("--multipart", default="largest", choices=["largest", "merge", "split"],
                     help="yolo segment: what to do with masks of several parts")
    exp.add_argument("--images", dest="yolo_images", default="symlink", choices=["symlink", "copy", "none"],
                     help="yolo: how images are placed in the export")
    _add_min_precision_options(exp)

    cal = sub.add_parser("calibrate", help="fit P(label correct) from a pulled review sample: p_correct, the run's"
                                           " precision/recall at every threshold (RUN_DIR/calibration/NAME.json)")
    cal.add_argument("run_dir")
    cal.add_argument("--reviewed", required=True, metavar="NAME", help="the pulled review sample RUN_DIR/reviewed/NAME")
    cal.add_argument("--name", help="calibration name (default: the --reviewed NAME)")
    cal.add_argument("--method", default="logistic", choices=["isotonic", "logistic"],
                     help="logistic on the score logits (one or more columns; default) or isotonic (one column;"
                          " its intervals undercover on small samples, see docs/review.md)")
    cal.add_argument("--columns", default="confidence", help="score columns, comma-separated (default confidence)")
    cal.add_argument("--target", type=float, default=0.9, help="target precision to find the threshold of (default 0.9)")
    cal.add_argument("--min-class-labels", type=int, default=50,
                     help="reviewed labels a class needs for a fit of its own; rarer classes share the pooled fit")
    cal.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates (default 200)")
    cal.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


    rev = sub.add_parser("review", help="export to FiftyOne and serve the App on localhost until Ctrl-C (URL printed)")
    rev.add_argument("run_dir")
    rev.add_argument("--dataset", help="FiftyOne dataset name (default: labelgen-RUN_ID); recorded for `labelgen pull`")
    rev.add_argument("--filtered", metavar="NAME", help="review RUN_DIR/filtered/NAME instead of all labels")
    rev.add_argument("--sample", type=int, metavar="N", help="export only a stratified random sample of N images (by"
                     " confidence band and class; recorded in RUN_DIR/review/samples/NAME.json) for verdicts:"
                     " accept, or tag false_positive / wrong_class / poor_mask; draw missed objects")
    rev.add_argument("--seed", type=int, default=0, help="--sample: random seed (default 0; same seed, same sample)")
    rev.add_argument("--no-app", action="store_true", help="export only; do not serve the App")
    rev.add_argument("--queue", action="store_true",
                     help="rank images by the expected errors a reviewer would fix there (wrong labels, class"
                          " confusion, missed objects) with a diversity term: review_priority on each sample and"
                          " the saved view review_queue sorted by it")
    rev.add_argument("--calibration", metavar="NAME",
                     help="--queue: p of each label from RUN_DIR/calibration/NAME (default: the raw confidence)")
    rev.add_argument("--diversity", type=float, default=0.5,
                     help="--queue: in [0, 1): 0 no diversity term; each near-duplicate already queued multiplies an"
                          " image's priority by 1 - DIVERSITY (default 0.5)")
    rev.add_argument("--port", type=int, default=5151, help="App port (default 5151)")
    rev.add_argument("--address", default="127.0.0.1",
                     help="App bind address (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")

    pull = sub.add_parser("pull", help="read back the review (tags, edits, added labels) into RUN_DIR/reviewed/NAME")
    pull.add_argument("run_dir")
    pull.add_argument("--dataset", help="FiftyOne dataset name (default: the run's only dataset; if it has several,"
                      " they are listed)")
    pull.add_argument("--name", default="reviewed", help="write RUN_DIR/reviewed/NAME (default: reviewed)")

    imp = sub.add_parser("import", help="import ground truth or other tools' predictions (COCO JSON or YOLO"
                         " folder) as a run directory")
    imp.add_argument("source", help="COCO JSON file or YOLO dataset folder")
    imp.add_argument("--format", required=True, choices=["coco", "yolo"], help="what SOURCE is")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--images-root", help="coco: folder that file_name is relative to")
    imp.add_argument("--split", help="yolo: split folder (e.g. train2017)")
    imp.add_argument("--predictions", action="store_true",
                     help="SOURCE holds another tool's predictions: coco annotations with 'score', yolo lines"
                     " ending with a confidence column; scores become 'confidence'")
    imp.add_argument("--dataset-json", help="coco --predictions: the dataset file a results list refers to")

    dif = sub.add_parser("diff", help="match two runs' labels per image by mask IoU: matched / only in A / only in B"
                         " / class changed (table, saved in RUN_A/diffs/, FiftyOne tags)")
    dif.add_argument("run_a", metavar="RUN_A", help="run directory A (the one whose dataset and report get the diff)")
    dif.add_argument("run_b", metavar="RUN_B", help="run directory B (may be RUN_A itself with --b-filtered/--b-set)")
    dif.add_argument("--iou", type=float, default=0.5, help="mask IoU that makes a pair (default 0.5)")
    dif.add_argument("--class-agnostic", action="store_true", help="match ignoring classes (class changed is 0)")
    for side in ("a", "b"):
        dif.add_argument(f"--{side}-filtered", metavar="NAME", help=f"side {side.upper()}: RUN_DIR/filtered/NAME")
        dif.add_argument(f"--{side}-reviewed", metavar="NAME", help=f"side {side.upper()}: RUN_DIR/reviewed/NAME")
        dif.add_argument(f"--{side}-set", dest=f"{side}_overrides", action="append", default=[], metavar="KEY=VALUE",
                         help=f"side {side.upper()}: filter option applied on the fly, e.g. min_confidence=0.5")
    dif.add_argument("--dataset", help="also export A to this FiftyOne dataset with each label tagged diff:matched /"
                                       " diff:only_a / diff:class_changed and B's other labels in labelgen_diff_b")
    dif.add_argument("--no-save", action="store_true", help="do not write RUN_A/diffs/NAME.json")
    dif.add_argument("--json", action="store_true", help="machine-readable output")

    rep = sub.add_parser("report", help="write a self-contained HTML report (plots + contact sheet) of a run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    rep.add_argument("--sample", type=int, default=12, help="images on the contact sheet (default 12)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the contact-sheet sample (default 0)")

    ev = sub.add_parser("eval", help="COCO AP/AR of the run's labels against ground truth (no model loaded)")
    ev.add_argument("run_dir")
    ev.add_argument("--gt", required=True, help="ground truth: COCO JSON, YOLO dataset folder/yaml, or a run directory")
    ev.add_argument("--gt-split", help="YOLO ground truth: split (e.g. train2017)")
    _add_label_source_options(ev, "evaluate", "evaluated before and after filtering")
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument("--class-agnostic", dest="class_agnostic", action="store_const", const=True, default=None,
                      help="one category for everything (default: class-aware when class names overlap)")
    mode.add_argument("--class-aware", dest="class_agnostic", action="store_const", const=False,
                      help="match prediction classes to ground-truth categories by name")
    ev.add_argument("--all-gt", action="store_true",
                    help="count every ground-truth image (those the run has no row for are misses); default: only"
                         " the ground-truth images the run has a row for, e.g. the labelled part of a partial run")
    ev.add_argument("--out", metavar="DIR", help="write eval.json and pr_segm.png / pr_bbox.png here")
    ev.add_argument("--json", action="store_true", help="machine-readable output")

    gens = sub.add_parser("generators", help="list the registered generators")
    gens.add_argument("--plugin", action="append", default=[], help="import MODULE first to register its generators")
    exps = sub.add_parser("exporters", help="list the registered export formats (labelgen export --format NAME)")
    exps.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                      help="import MODULE first to register its exporters")
    _fill_in_help(sub)
    return parser


DESCRIPTION = """Instance-segmentation labels for images that have no annotations (Zip: CLIP finds the
objects, SAM draws their masks), written to a run directory you can stop and resume; then
filter, review, evaluate and export them (COCO, YOLO, FiftyOne)."""
EPILOG = """typical use:
  labelgen run recipes/zip-paper.yaml --images DIR --out runs/r1   (rerun the same command to resume)
  labelgen status runs/r1
  labelgen filter runs/r1 --min-confidence 0.5 --save confident
  labelgen export runs/r1 --filtered confident --format coco --out exports/coco

exit status: 0 done; 1 finished but some shards crashed (rerun to retry them); 2 an error that says
what to fix (bad recipe, missing weights, different settings...); 130 interrupted.
`labelgen COMMAND --help` describes each command."""
RUN_DIR_HELP = "run directory (the --out of `labelgen run`)"


def _fill_in_help(subcommands: argparse._SubParsersAction) -> None:
    """Each command's --help starts with its one-line summary; RUN_DIR is explained the same way everywhere."""
    summaries = {action.dest: action.help for action in subcommands._choices_actions}
    for name, parser in subcommands.choices.items():
        parser.description = parser.description or summaries.get(name)
        for action in parser._actions:
            if action.dest == "run_dir" and not action.help:
                action.help = RUN_DIR_HELP


# top-level modules of the optional extras (pyproject.toml): a core install names the extra to add
_EXTRAS = {"torch": "models", "torchvision": "models", "open_clip": "models", "segment_anything": "models",
           "sam2": "sam2", "sam3": "sam3", "fiftyone": "review", "ray": "cluster"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        commands = {"run": _cmd_run, "status": _cmd_status, "filter": _cmd_filter, "export": _cmd_export,
                    "review": _cmd_review, "pull": _cmd_pull, "import": _cmd_import, "generators": _cmd_generators,
                    "exporters": _cmd_exporters,
                    "report": _cmd_report, "diff": _cmd_diff, "eval": _cmd_eval, "recipes": _cmd_recipes,
                    "calibrate": _cmd_calibrate}
        return commands[args.command](args)
    except LabelgenError as exc:
        print(f"labelgen: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a core install running what needs an extra
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"labelgen: error: {exc}: this needs the `{extra}` extra (pip install \"labelgen[{extra}]\","
              f" or -e \".[{extra}]\" in a checkout)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelgen: interrupted; committed shards are kept. Rerun the same command to resume.", file=sys.stderr)
        return 130


def _setup_logging(verbose: bool) -> None:
    """labelgen's own messages from INFO up; other libraries' (open_clip logs every model it builds on
    the root logger at INFO) from WARNING up, unless -v, which shows everything from DEBUG up."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)  # also when already configured
    logging.getLogger("labelgen").setLevel(logging.DEBUG if verbose else logging.INFO)


def _resolve_recipe(name: str) -> Path:
    from .config import find_recipe

    return find_recipe(name)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .config import recipe_summary, shipped_recipes

    recipes = shipped_recipes()
    width = max((len(name) for name in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .generators import load_plugins
    from .engine.runner import run
    from .engine.sources import open_source

    load_plugins(args.plugin)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"execution.workers={args.workers}")
    if args.device is not None:
        overrides.append(f"execution.device={args.device}")
    if args.cache_dir:
        overrides.append(f"execution.cache_dir={json.dumps(args.cache_dir)}")
    if args.batch_size is not None:
        overrides.append(f"execution.batch_size={args.batch_size}")
    overrides += _backend_overrides(args.backend, args.ray_address)
    recipe = load_recipe(_resolve_recipe(args.recipe), overrides)
    options = {"extensions": recipe.images.extensions} if args.images_kind in ("auto", "folder") else {}
    if args.images_root:
        options["images_root"] = args.images_root
    source = open_source(args.images, kind=args.images_kind, **options)
    bar = _ProgressBar(enabled=not args.no_progress)
    try:
        result = run(recipe, source, args.out, extend=args.extend, new_run=args.new_run,
                     plugins=args.plugin, progress=bar.callbacks())
    finally:
        bar.close()
    _print_run_result(result)
    return 1 if result.shards_failed else 0


def _backend_overrides(backend: str | None, ray_address: str | None) -> list[str]:
    from .errors import ConfigError

    if ray_address is not None:
        if backend == "local":
            raise ConfigError("--ray-address is for --backend ray; drop it to run locally")
        backend = "ray"
    overrides = [f"execution.backend={backend}"] if backend is not None else []
    if ray_address is not None:  # JSON-quoted: a YAML string whatever the address looks like
        overrides.append(f"execution.ray_address={json.dumps(ray_address)}")
    return overrides


def _print_run_result(result) -> None:
    from .store.status import format_status, run_status

    if result.images_added:
        print(f"planned {result.images_added} new images", file=sys.stderr)
    if result.shards_corrupt:
        print(f"labelgen: {len(result.shards_corrupt)} committed shards did not verify: moved to corrupt/ and"
              " redone (see the warnings above)", file=sys.stderr)
    print(f"{result.shards_done} shards run, {result.shards_skipped} already done", file=sys.stderr)
    print(format_status(run_status(result.root)))
    if result.shards_failed:
        print(f"labelgen: {len(result.shards_failed)} shards crashed (see shards/*.error.json);"
              " rerun the same command to retry them", file=sys.stderr)


def _cmd_status(args: argparse.Namespace) -> int:
    from .store.status import format_status, run_status

    status = run_status(args.run_dir, verify=args.verify)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 1 if status["corrupt"] else 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from .postprocess.filter_config import load_filter_config
    from .postprocess.filter_store import FilterSummary, filter_run, save_filtered, sweep, warn_if_incomplete
    from .store.run_store import RunStore

    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, key)}" for _, key, _ in _FILTER_FLAGS if getattr(args, key) is not None]
    overrides += [f"{key}=true" for key in ("drop_border", "fill_holes") if getattr(args, key)]
    config = load_filter_config(args.config, overrides)
    store = RunStore(args.run_dir)
    selection = None
    if args.min_precision is not None:
        from .review.calibration import min_precision_filter

        store, config, selection = min_precision_filter(args.run_dir, args.calibration, args.min_precision, config)
        print(f"min precision {args.min_precision}: {json.dumps(selection)}", file=sys.stderr)
    class_names = store.manifest().get("class_names")
    if not args.save:  # save_filtered warns itself (and records it in summary.json)
        warn_if_incomplete(store, "filter")
    if args.sweep:
        column = args.sweep_column or config.confidence_column
        results = sweep(store, config, column, _sweep_values(args.sweep), class_names)
        if args.json:
            print(json.dumps([{"value": v, "kept": k} for v, k in results]))
        else:
            print(f"{'min ' + column:>24}  kept")
            print("\n".join(f"{value:>24.4g}  {kept}" for value, kept in results))
        return 0
    if args.save:
        folder = save_filtered(store, config, args.save, class_names)
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        print(json.dumps(summary, indent=1) if args.json else _saved_line(folder, summary))
        return 0
    summary = FilterSummary()
    for _, result in filter_run(store, config, class_names):
        if result is not None:
            summary.add(result, class_names)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else summary.table())
    return 0


def _saved_line(folder: Path, summary: dict) -> str:
    """``filter --save``'s one line: what was kept, of how much, and why the rest was rejected."""
    total = summary["total"]
    rejected = ", ".join(f"{reason} {total[reason]}" for reason in summary["reasons"])
    failed = f" (+{summary['failed_images']} failed images, copied as failed)" if summary["failed_images"] else ""
    return (f"saved {folder}: {total['kept']} of {total['total']} labels kept on {summary['images']} images{failed}"
            f" from {summary['shards']} shards" + (f"; rejected: {rejected}" if rejected else ""))


def _sweep_values(text: str) -> list[float]:
    from .errors import ConfigError

    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [round(start + i * step, 10) for i in range(count)]
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep expects 'start:stop:step' (start <= stop, step > 0) or 'v1,v2,...';"
                          f" got {text!r}") from None


def _export_formats_help() -> str:
    from .exports import EXPORTERS

    formats = "; ".join(f"{name}: {EXPORTERS.get(name).summary}" for name in EXPORTERS.names())
    return f"{formats}; or a plugin's format (--plugin MODULE; list them with `labelgen exporters`)"


def _cmd_export(args: argparse.Namespace) -> int:
    from .exports import EXPORTERS, export
    from .exports.source import open_export_source
    from .generators import load_plugins
    from .postprocess.filter_config import load_filter_config

    load_plugins(args.plugin)
    EXPORTERS.get(args.format)  # an unknown format fails before the run is read
    filter_config = None
    if args.filter_config or args.overrides:
        filter_config = load_filter_config(args.filter_config, args.overrides)
    source = open_export_source(args.run_dir, filter_config=filter_config, filtered=args.filtered,
                                reviewed=args.reviewed)
    selection = None
    if args.min_precision is not None:
        import dataclasses

        from .review.calibration import min_precision_filter, record_in_export_report

        if args.filtered or args.reviewed:
            raise LabelgenError("--min-precision applies to the run's own labels: drop --filtered/--reviewed")
        store, config, selection = min_precision_filter(args.run_dir, args.calibration, args.min_precision,
                                                        filter_config)
        source = dataclasses.replace(source, store=store, filter_config=config)
    elif args.calibration:  # p_correct beside the raw score columns
        import dataclasses

        from .review.calibration import CalibratedStore, load_calibration

        calibration = load_calibration(args.run_dir, args.calibration)
        source = dataclasses.replace(source, store=CalibratedStore(source.store, calibration))
    report = export(args.format, source, _export_request(args))
    if selection is not None and args.out:
        record_in_export_report(args.out, selection)
    print(_report_text(report))
    if selection is not None:
        print(json.dumps({"precision_target": selection}, indent=1))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .review.calibration import calibrate_run, calibration_paths

    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    data = calibrate_run(args.run_dir, args.reviewed, name=args.name, method=args.method, columns=columns,
                         target=args.target, min_class_labels=args.min_class_labels, replicates=args.bootstrap,
                         seed=args.seed)
    json_path, png_path = calibration_paths(args.run_dir, data["name"])
    point = data["threshold"]
    print(f"calibrated on {data['sample']['labels']} labels of {data['sample']['images']} reviewed images"
          f" ({data['method']}); ECE raw {data['ece']['raw']:.3f} -> calibrated {data['ece']['calibrated']:.3f}")
    if point is None:
        print(f"no threshold reaches an estimated precision of {data['target_precision']}")
    else:
        print(f"precision {data['target_precision']}: p_correct >= {point['threshold']} keeps {point['kept']} of"
              f" {data['run']['labels']} labels, estimated precision {point['precision']:.3f}"
              f" [{point['precision_low']:.3f}, {point['precision_high']:.3f}], recall {point['recall']:.3f}"
              f" [{point['recall_low']:.3f}, {point['recall_high']:.3f}]")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _export_request(args: argparse.Namespace):
    """The ``ExportRequest`` of ``labelgen export``'s options (format options keyed as exporters read them)."""
    from .exports import ExportRequest

    options = {"mask_format": args.mask_format, "polygon_tolerance": args.polygon_tolerance, "task": args.task,
               "multipart": args.multipart, "images": args.yolo_images}
    return ExportRequest(out=Path(args.out) if args.out else None, dataset=args.dataset,
                        images_root=args.images_root, options=options)


def _report_text(report) -> str:
    import dataclasses

    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report
    return json.dumps(data, indent=1, default=str)


def _cmd_review_sample(args: argparse.Namespace) -> int:
    from .review.sample import export_sample

    done = export_sample(args.run_dir, args.sample, seed=args.seed, dataset_name=args.dataset, filtered=args.filtered)
    name = done.record["name"]
    print(f"sampled {done.record['size']} images ({len(done.record['strata'])} strata, seed {args.seed}), recorded in"
          f" {done.path}; exported {done.export.labels} labels to FiftyOne dataset {name!r}")
    print("accept each label (no tag) or tag it false_positive / wrong_class / poor_mask; draw missed objects as new"
          f" labels or tag the sample missing_object; then run: labelgen pull {args.run_dir} --dataset {name}"
          f" --name {name}")
    if args.no_app:
        return 0
    return _serve_app(args, name)


def _serve_app(args: argparse.Namespace, name: str, view: str | None = None) -> int:
    """Serve the FiftyOne App on dataset ``name`` (a saved ``view`` of it) until Ctrl-C; the URL last."""
    from .exports.fiftyone import import_fiftyone

    fo = import_fiftyone()
    dataset = fo.load_dataset(name)
    session = fo.launch_app(dataset.load_saved_view(view) if view else dataset, address=args.address,
                            port=args.port, remote=True)
    host = "127.0.0.1" if args.address in ("", "0.0.0.0") else args.address
    print(f"serving the App until Ctrl-C; open:\n\n    http://{host}:{args.port}/datasets/{name}\n", flush=True)
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        session.close()
    return 0


def _cmd_review_queue(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .exports.source import open_export_source
    from .review.queue import QUEUE_VIEW, queue_source, write_queue_fiftyone
    from .review.review import default_dataset_name

    if args.sample is not None:
        raise ConfigError("choose one of --sample N and --queue")
    name = args.dataset or default_dataset_name(args.run_dir)
    source = open_export_source(args.run_dir, filtered=args.filtered)
    queue = queue_source(source, calibration=args.calibration, diversity=args.diversity)
    done = write_queue_fiftyone(source, name, queue)
    print(f"ranked {done['images']} images into FiftyOne dataset {name!r}: field review_priority, saved view"
          f" {QUEUE_VIEW!r}; first to review:")
    for item in queue[:10]:
        print(f"  {item.rank:>4}  {item.image_id}  priority {item.review_priority:.3f}  (expected errors"
              f" {item.expected_errors:.3f}: wrong labels {item.wrong_labels:.3f}, class confusion"
              f" {item.class_confusion:.3f}, missed {item.missed:.3f})")
    if args.no_app:
        return 0
    return _serve_app(args, name, view=QUEUE_VIEW)


def _cmd_review(args: argparse.Namespace) -> int:
    from .review.review import default_dataset_name, launch_review, quiet_fiftyone_console

    quiet_fiftyone_console()  # FiftyOne's messages once, through our logging; its banner is replaced by ours
    if args.sample is not None:
        return _cmd_review_sample(args)
    if args.queue:
        return _cmd_review_queue(args)
    name = args.dataset or default_dataset_name(args.run_dir)
    if args.no_app:
        from .exports.fiftyone import export_fiftyone
        from .exports.source import open_export_source

        report = export_fiftyone(open_export_source(args.run_dir, filtered=args.filtered), name)
        print(f"exported {report.images} images, {report.labels} labels to FiftyOne dataset {name!r}")
        return 0
    review = launch_review(args.run_dir, name, port=args.port, address=args.address, filtered=args.filtered,
                           wait=False)
    pull = f"labelgen pull {args.run_dir}" + (f" --dataset {name}" if args.dataset else "")
    print(f"exported {review.export.images} images, {review.export.labels} labels to FiftyOne dataset {name!r}")
    print(f"tag labels 'approved' / 'rejected', edit or add labels in the App, then run: {pull}")
    if args.address in ("127.0.0.1", "localhost"):
        print(f"on a remote machine? forward the port first: ssh -N -L {args.port}:127.0.0.1:{args.port} USER@HOST")
    print("serving the App until Ctrl-C (closing the browser tab does not stop it); open:")
    print(f"\n    {review.url}\n", flush=True)
    try:
        review.session.wait(-1)
    except KeyboardInterrupt:
        review.session.close()
        print(f"labelgen: App stopped. Pull the review with: {pull}", file=sys.stderr)
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from .review.review import pull_review, quiet_fiftyone_console

    quiet_fiftyone_console()
    report = pull_review(args.run_dir, args.dataset, name=args.name)
    print(f"pulled the review in FiftyOne dataset {report.dataset!r} into {report.path}", file=sys.stderr)
    print(_report_text(report))
    print(f"export the reviewed labels with: labelgen export {args.run_dir} --reviewed {args.name} --format coco --out DIR")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .errors import ExportError
    from .exports.importers import import_coco, import_yolo, write_imported_run

    if args.dataset_json and not (args.predictions and args.format == "coco"):
        raise ExportError("--dataset-json is for a COCO results list: use it with --format coco --predictions")
    if args.predictions:
        from .exports.predictions import import_coco_predictions, import_yolo_predictions

        dataset = import_coco_predictions(args.source, dataset_json=args.dataset_json,
                                          images_root=args.images_root) if args.format == "coco" else \
            import_yolo_predictions(args.source, split=args.split)
    elif args.format == "coco":
        dataset = import_coco(args.source, images_root=args.images_root)
    else:
        dataset = import_yolo(args.source, split=args.split)
    print(f"imported into {write_imported_run(dataset, args.out)}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from .exports.source import open_export_source
    from .postprocess.filter_config import load_filter_config
    from .review.diff import diff_sources, resolve_class_agnostic, save_diff, tag_fiftyone

    sources = []
    for side in ("a", "b"):
        overrides = getattr(args, f"{side}_overrides")
        sources.append(open_export_source(getattr(args, f"run_{side}"),
                                          filter_config=load_filter_config(None, overrides) if overrides else None,
                                          filtered=getattr(args, f"{side}_filtered"),
                                          reviewed=getattr(args, f"{side}_reviewed")))
    class_agnostic, why = resolve_class_agnostic(*sources, args.class_agnostic)
    if class_agnostic and not args.class_agnostic:
        print(f"labelgen: matching ignores classes ({why})", file=sys.stderr)
    if args.dataset:
        from .review.review import quiet_fiftyone_console

        quiet_fiftyone_console()
        summary = tag_fiftyone(*sources, args.dataset, iou=args.iou, class_agnostic=class_agnostic)
    else:
        summary = diff_sources(*sources, iou=args.iou, class_agnostic=class_agnostic)
    if not args.no_save:
        print(f"saved {save_diff(*sources, summary)}", file=sys.stderr)
    if args.dataset:
        print(f"tagged FiftyOne dataset {args.dataset!r} (saved views diff_changes, diff_only_a, diff_only_b,"
              " diff_class_changed)", file=sys.stderr)
    from .review.diff import describe_source, format_table

    data = {**summary.to_dict(), "a": describe_source(sources[0]), "b": describe_source(sources[1])}
    print(json.dumps(data, indent=1) if args.json else format_table(data))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .review.report import build_report

    print(build_report(args.run_dir, args.out, sample_images=args.sample, seed=args.seed))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .atomic import write_json_atomic
    from .errors import ConfigError
    from .review.evaluation import evaluate, evaluate_before_after, load_ground_truth, plot_pr_curves
    from .exports.paths import safe_join
    from .exports.source import open_export_source
    from .postprocess.filter_config import load_filter_config

    gt = load_ground_truth(args.gt, split=args.gt_split)
    if args.filter_config or args.overrides:
        if args.filtered or args.reviewed:
            raise ConfigError("choose one of --filtered NAME, --reviewed NAME, or filter options")
        config = load_filter_config(args.filter_config, args.overrides)
        results = evaluate_before_after(args.run_dir, gt, config, class_agnostic=args.class_agnostic,
                                        all_gt=args.all_gt)
        payload = {name: result.to_dict() for name, result in results.items()}
        text = "\n\n".join(f"{name} filtering\n{result.table()}" for name, result in results.items())
    else:
        source = open_export_source(args.run_dir, filtered=args.filtered, reviewed=args.reviewed)
        results = {"": evaluate(source, gt, class_agnostic=args.class_agnostic, all_gt=args.all_gt)}
        payload, text = results[""].to_dict(), results[""].table()
    print(results[next(iter(results))].scope, file=sys.stderr)  # which ground-truth images were counted
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(safe_join(out, "eval.json"), payload, "evaluation")
        for iou_type in results[next(iter(results))].iou_types:
            plot_pr_curves(results, safe_join(out, f"pr_{iou_type}.png"), iou_type)
        print(f"wrote {safe_join(out, 'eval.json')} and pr_*.png", file=sys.stderr)
    print(json.dumps(payload, indent=1) if args.json else text)
    return 0


def _cmd_generators(args: argparse.Namespace) -> int:
    from .generators import GENERATORS, load_plugins

    load_plugins(args.plugin)
    for name in GENERATORS.names():
        print(name)
    return 0


def _cmd_exporters(args: argparse.Namespace) -> int:
    from .exports import EXPORTERS
    from .generators import load_plugins

    load_plugins(args.plugin)
    for name in EXPORTERS.names():
        print(f"{name}\t{EXPORTERS.get(name).summary}")
    return 0


class _ProgressBar:
    """tqdm bar in images: done, images/s and ETA. Created lazily when the run knows its size."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def callbacks(self):
        from .engine.runner import RunProgress

        return RunProgress(on_start=self._start, on_images=self._update)

    def _start(self, total: int, done: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True, smoothing=0.1,
                            file=sys.stderr, desc="labelling")

    def _update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
