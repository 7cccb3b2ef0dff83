"""The command line: run, status, generators, and how errors are shown."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_models
from labelgen.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_then_status(tmp_path, image_dir, capsys):
    out = tmp_path / "run"
    args = ["run", str(REPO / "recipes/fake-smoke.yaml"), "--plugin", "labelgen.testing", "--images", str(image_dir),
            "--out", str(out), "--set", "store.shard_size=3", "--no-progress"]
    code, stdout, stderr = _run(args, capsys)
    assert code == 0, stderr
    assert "4 shards run, 0 already done" in stderr and "10 labelled" in stdout
    code, stdout, stderr = _run(args, capsys)
    assert code == 0 and "0 shards run, 4 already done" in stderr
    code, stdout, _ = _run(["status", str(out), "--json"], capsys)
    status = json.loads(stdout)
    assert code == 0 and status["shards"]["done"] == 4 and status["images"]["ok"] == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope.yaml", "--images", ".", "--out", "x"], "recipe file not found"),
        (["run", "RECIPE", "--images", "/nonexistent/dir", "--out", "OUT"], "/nonexistent/dir"),
        (["run", "RECIPE", "--images", "IMAGES", "--out", "OUT", "--set", "store.shardsize=2"],
         "Did you mean 'store.shard_size'?"),
        (["run", "RECIPE", "--images", "IMAGES", "--out", "OUT", "--set", "generator.name=nope"],
         "unknown generator 'nope'; available:"),
        (["status", "OUT_EMPTY"], "not a labelgen run directory"),
    ],
)
def test_errors_are_one_line_messages_with_exit_2(tmp_path, image_dir, capsys, args, message):
    (tmp_path / "empty").mkdir()
    subst = {"RECIPE": str(REPO / "recipes/fake-smoke.yaml"), "IMAGES": str(image_dir), "OUT": str(tmp_path / "o"),
             "OUT_EMPTY": str(tmp_path / "empty")}
    args = [subst.get(a, a) for a in args] + (["--plugin", "labelgen.testing"] if args[0] == "run" else [])
    code, _, stderr = _run(args, capsys)
    assert code == 2
    assert stderr.startswith("labelgen: error:") and message in stderr
    assert "Traceback" not in stderr


def test_config_mismatch_exit_2_then_new_run(tmp_path, image_dir, capsys):
    base = ["run", str(REPO / "recipes/fake-smoke.yaml"), "--plugin", "labelgen.testing", "--images", str(image_dir),
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert _run(base, capsys)[0] == 0
    code, _, stderr = _run(base + ["--set", "generator.instances_per_image=1"], capsys)
    assert code == 2 and "generator.instances_per_image: 3 -> 1" in stderr
    code, _, stderr = _run(base + ["--set", "generator.instances_per_image=1", "--new-run"], capsys)
    assert code == 0 and (tmp_path / "run" / "archive").is_dir()


def test_generators_lists_registered_names(capsys):
    code, stdout, _ = _run(["generators", "--plugin", "labelgen.testing"], capsys)
    assert code == 0 and stdout.split() == ["fake", "sam-auto", "sam2-auto", "sam3", "zip"]


def test_fake_generator_is_not_available_without_the_plugin(tmp_path, image_dir):
    """Nothing user-facing silently uses the test generator: a fresh process does not know it."""
    env = {k: v for k, v in os.environ.items() if k != "LABELGEN_PLUGINS"}
    out = subprocess.run([sys.executable, "-m", "labelgen.cli", "run", str(REPO / "recipes/fake-smoke.yaml"),
                          "--images", str(image_dir), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "unknown generator 'fake'; available: sam-auto, sam2-auto, sam3, zip" in out.stderr


@pytest.mark.skipif(shutil.which("labelgen") is None and not (Path(sys.executable).parent / "labelgen").exists(),
                    reason="console script not installed")
@needs_models
def test_default_job_without_weights_stops_at_once_with_a_clear_message(tmp_path, coco128_images):
    """The README's main job on a machine without weights: exit 2, names the file, writes nothing."""
    script = Path(sys.executable).parent / "labelgen"
    env = {**os.environ, "LABELGEN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([str(script), "run", "recipes/zip-paper.yaml", "--images", str(coco128_images),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "labelgen: error:" in out.stderr and "pretrained" in out.stderr
    assert "3 weight files are missing" in out.stderr  # every missing file at once, not one per attempt
    for name in ("ViT-B-16/openai", "RN50x64/openai", "sam_vit_h_4b8939.pth"):
        assert name in out.stderr, name
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def _fake_run(tmp_path, image_dir, capsys):
    out = tmp_path / "run"
    args = ["run", str(REPO / "recipes/fake-smoke.yaml"), "--plugin", "labelgen.testing", "--images", str(image_dir),
            "--out", str(out), "--no-progress"]
    assert _run(args, capsys)[0] == 0
    return out


def test_filter_table_sweep_and_save(tmp_path, image_dir, capsys):
    out = _fake_run(tmp_path, image_dir, capsys)
    code, stdout, _ = _run(["filter", str(out), "--sweep", "0:1:0.5", "--json"], capsys)
    sweep = json.loads(stdout)
    assert code == 0 and [s["value"] for s in sweep] == [0.0, 0.5, 1.0]
    assert sweep[0]["kept"] >= sweep[1]["kept"] >= sweep[2]["kept"]
    code, stdout, _ = _run(["filter", str(out), "--min-confidence", "0.5", "--json"], capsys)
    summary = json.loads(stdout)
    assert code == 0 and summary["total"]["kept"] == sweep[1]["kept"]  # same count as the sweep at 0.5
    code, stdout, _ = _run(["filter", str(out), "--min-confidence", "0.5", "--save", "half"], capsys)
    assert code == 0 and (out / "filtered" / "half" / "summary.json").is_file()
    kept = json.loads((out / "filtered" / "half" / "summary.json").read_text())
    assert kept["total"]["kept"] == sweep[1]["kept"] and kept["images"] == 10
    code, _, stderr = _run(["filter", str(out), "--save", "../escape"], capsys)
    assert code == 2 and not (out / "escape").exists() and not (tmp_path / "escape").exists()


def test_filter_cli_works_with_model_libraries_unimportable(tmp_path, image_dir, capsys):
    out = _fake_run(tmp_path, image_dir, capsys)
    script = ("import sys\n"
              "for name in ('torch', 'torchvision', 'open_clip', 'segment_anything'):\n"
              "    sys.modules[name] = None  # any import of them now raises ImportError\n"
              "from labelgen.cli import main\n"
              f"sys.exit(main(['filter', {str(out)!r}, '--nms-iou', '0.5', '--min-confidence', '0.3',"
              " '--save', 'nomodel']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "filtered" / "nomodel" / "filter.yaml").is_file()


def test_every_command_and_option_has_help_and_the_description_is_for_users():
    import argparse

    from labelgen.cli import build_parser

    parser = build_parser()
    assert "Instance-segmentation labels" in parser.description and "``" not in parser.description
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if not sub.description:
                    missing.append(f"{name} (description)")
                missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if not a.help]
            missing += [f"{a.dest} (summary)" for a in action._choices_actions if not a.help]
    assert missing == []


def _tiny_run_stderr(tmp_path, image_dir, *flags):
    out = tmp_path / f"run{len(flags)}"
    done = subprocess.run([sys.executable, "-m", "labelgen.cli", *flags, "run", "recipes/zip-tiny-random.yaml",
                           "--images", str(image_dir), "--out", str(out), "--no-progress",
                           "--set", "store.shard_size=10"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith(("INFO ", "DEBUG "))]


@needs_models
def test_model_library_info_messages_are_hidden_unless_verbose(tmp_path, image_dir):
    """open_clip logs several INFO lines per model it builds (on the root logger): not by default, yes with -v."""
    quiet = _tiny_run_stderr(tmp_path, image_dir)
    assert all(line.startswith("INFO labelgen") for line in quiet), quiet
    verbose = _tiny_run_stderr(tmp_path, image_dir, "-v")
    assert any(line.startswith("INFO root") for line in verbose), verbose[:20]
