import os
from pathlib import Path

import pytest

import labelgen.testing  # noqa: F401  registers the fake generator
from labelgen.config import apply_overrides, recipe_from_dict
from labelgen.testing import fake_recipe_dict
from labelgen.testing_images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("LABELGEN_COCO128", REPO.parent / "shared" / "assets" / "data" / "coco128-seg"))


def make_recipe(*overrides, **generator):
    return recipe_from_dict(apply_overrides(fake_recipe_dict(**generator), list(overrides)))


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    make_image_folder(folder, 10, size=(32, 24))
    return folder


@pytest.fixture
def coco128_images():
    folder = COCO128 / "images" / "train2017"
    if not folder.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    return folder
