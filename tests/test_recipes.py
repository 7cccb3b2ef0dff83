"""Shipped recipes: package data, listed by `labelgen recipes`, found by name from any folder."""
import pytest

from conftest import REPO
from labelgen.cli import main
from labelgen.config import SHIPPED_RECIPES, find_recipe, load_recipe, recipe_summary, shipped_recipes
from labelgen.errors import ConfigError

NAMES = ["fake-smoke", "sam-auto", "sam-auto-tiny-random", "sam2-auto", "sam2-auto-tiny-random", "sam3",
         "sam3-tiny-random", "zip-cpu", "zip-paper", "zip-sam2", "zip-sam2-tiny-random", "zip-smoke-random",
         "zip-tiny-random"]


def test_the_repository_recipes_folder_is_the_shipped_one():
    assert (REPO / "recipes").resolve() == SHIPPED_RECIPES == (REPO / "labelgen" / "recipes").resolve()
    assert list(shipped_recipes()) == NAMES
    assert all(path.parent == SHIPPED_RECIPES for path in shipped_recipes().values())


def test_every_shipped_recipe_loads_and_has_a_one_line_summary():
    import labelgen.testing  # noqa: F401  registers the fake generator of fake-smoke

    for name, path in shipped_recipes().items():
        assert load_recipe(path).description, name
        summary = recipe_summary(path)
        assert summary and "\n" not in summary and summary == load_recipe(path).description.splitlines()[0].strip()


def test_labelgen_recipes_lists_names_and_first_description_lines(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the shipped ones are listed
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    cpu = next(line for line in lines if line.startswith("zip-cpu "))
    assert cpu.split(None, 1)[1] == recipe_summary(SHIPPED_RECIPES / "zip-cpu.yaml")
    assert "Zip on a CPU budget" in cpu


def test_a_bare_name_finds_the_shipped_recipe_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("zip-cpu") == find_recipe("zip-cpu.yaml") == SHIPPED_RECIPES / "zip-cpu.yaml"


def test_an_existing_path_wins_then_the_local_recipes_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "zip-cpu.yaml").write_text("description: mine\n")
    mine = tmp_path / "recipes" / "zip-cpu.yaml"
    assert find_recipe("zip-cpu").resolve() == find_recipe("zip-cpu.yaml").resolve() == mine
    (tmp_path / "zip-cpu.yaml").write_text("description: here\n")
    assert find_recipe("zip-cpu.yaml").resolve() == tmp_path / "zip-cpu.yaml"
    assert find_recipe(str(tmp_path / "zip-cpu.yaml")) == tmp_path / "zip-cpu.yaml"


def test_a_path_stays_a_path(tmp_path):
    for name in (str(tmp_path / "zip-cpu.yaml"), "other/zip-cpu.yaml", "zip-cpu.yml"):
        assert str(find_recipe(name)) == name
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(find_recipe(str(tmp_path / "zip-cpu.yaml")))


def test_an_unknown_name_lists_the_shipped_ones_and_suggests_the_nearest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        find_recipe("zip-cpuu")
    message = str(caught.value)
    assert message.startswith("recipe file not found: zip-cpuu") and "Did you mean 'zip-cpu'?" in message
    assert all(name in message for name in NAMES)


def test_labelgen_run_takes_a_shipped_name_from_another_folder(tmp_path, image_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "fake-smoke", "--plugin", "labelgen.testing", "--images", str(image_dir),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "run" / "run.json").is_file()
    assert main(["run", "fake-smok", "--images", str(image_dir), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelgen: error: recipe file not found: fake-smok") and "Did you mean 'fake-smoke'?" in err
    assert not (tmp_path / "other").exists()
