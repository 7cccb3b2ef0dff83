"""The attack script itself (bench/attack.py), in a short form: real kill -9s and damaged files all hold."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_attack_campaign_holds(coco128_images):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "attack.py"), "--kills", "6", "--images", "48",
                           "--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "18 attempts, 18 held" in done.stdout, done.stdout
