"""Local (loky) workers keep their models: loky must not replace a worker whose memory grew."""
import os
import time

import numpy as np
import pytest

from labelgen.engine.backends import keep_worker_with_its_models

pytest.importorskip("psutil")  # loky only checks worker memory when psutil is installed

_MODELS: list[np.ndarray] = []  # per worker process, like worker.py's generator cache


def _shard_job(keep: bool) -> int:
    """Hold 400 MB more after the first job (a model loading late), then work a little."""
    if keep:
        keep_worker_with_its_models()
    if len(_MODELS) == 1:
        _MODELS.append(np.ones(400 << 20, np.uint8))  # touched pages: real RSS growth
    else:
        _MODELS.append(np.zeros(1, np.uint8))
    time.sleep(1.2)  # loky checks memory at most once a second
    return os.getpid()


def _pids(keep: bool) -> set[int]:
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)  # a fresh worker for each case
    pids = Parallel(n_jobs=2, backend="loky")(delayed(_shard_job)(keep) for _ in range(2 * 3))
    get_reusable_executor().shutdown(wait=True)
    return set(pids)


@pytest.mark.slow
def test_loky_replaces_a_grown_worker_unless_told_not_to():
    assert len(_pids(keep=False)) > 2  # the control: loky restarted a worker that grew by 400 MB
    assert len(_pids(keep=True)) == 2  # labelgen's workers keep their process (and models)
