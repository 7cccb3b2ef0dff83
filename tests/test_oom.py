"""OOM back-off: halve the batch on an out-of-memory error, same results as batch size 1."""
import logging

import pytest

from labelgen.errors import ValidationError
from labelgen.models.oom import default_is_oom, run_with_backoff


class FakeModel:
    """Doubles its inputs; raises a simulated OOM for batches larger than ``limit``."""

    def __init__(self, limit, error=lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        self.limit, self.error = limit, error
        self.calls: list[int] = []  # batch sizes, in call order
        self.ooms = 0

    def __call__(self, batch):
        self.calls.append(len(batch))
        if len(batch) > self.limit:
            self.ooms += 1
            raise self.error()
        return [2 * x for x in batch]


@pytest.mark.parametrize("n_items, batch_size, limit, expected_calls", [
    (10, 8, 3, [8, 4, 2, 2, 2, 2, 2]),   # 8 -> 4 -> 2, then 2 for the rest (last batch: 2 items)
    (10, 4, 4, [4, 4, 2]),                # never too big: no retry, short last batch
    (5, 16, 1, [5, 2, 1, 1, 1, 1, 1]),    # a short first batch halves from its own length
    (3, 1, 1, [1, 1, 1]),
    (0, 4, 1, []),
])
def test_backoff_gives_the_batch_size_1_results_with_the_expected_retries(n_items, batch_size, limit,
                                                                           expected_calls, caplog):
    items = list(range(n_items))
    model = FakeModel(limit)
    with caplog.at_level(logging.WARNING, logger="labelgen.models.oom"):
        out = run_with_backoff(model, items, batch_size)
    assert out == run_with_backoff(FakeModel(1), items, 1) == [2 * x for x in items]
    assert model.calls == expected_calls
    retries = sum(1 for size in expected_calls if size > limit)
    assert model.ooms == retries
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == retries


def test_oom_on_a_single_item_is_raised():
    model = FakeModel(0)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_backoff(model, [1, 2, 3], 4)
    assert model.calls == [3, 1]


@pytest.mark.parametrize("error, is_oom", [
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("CUDA error: Out Of Memory"), True),
    (MemoryError("out of memory"), True),
    (MemoryError(), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
    (KeyError("x"), False),
])
def test_default_is_oom(error, is_oom):
    assert default_is_oom(error) is is_oom


def test_torch_out_of_memory_error_is_recognised():
    torch = pytest.importorskip("torch")
    assert default_is_oom(torch.cuda.OutOfMemoryError("Tried to allocate 1 GiB"))


def test_other_errors_propagate_without_retry():
    calls = []

    def broken(batch):
        calls.append(len(batch))
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_backoff(broken, range(8), 4)
    assert calls == [4]


def test_custom_is_oom_and_memory_error():
    model = FakeModel(2, error=lambda: MemoryError())
    assert run_with_backoff(model, range(6), 6) == [0, 2, 4, 6, 8, 10]
    never = FakeModel(2)
    with pytest.raises(RuntimeError):
        run_with_backoff(never, range(6), 6, is_oom=lambda exc: False)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_is_refused(batch_size):
    with pytest.raises(ValidationError, match="batch_size"):
        run_with_backoff(lambda b: b, [1], batch_size)


def test_fn_must_return_one_result_per_item():
    with pytest.raises(ValidationError, match="one per item"):
        run_with_backoff(lambda b: b[:1], [1, 2, 3], 3)
