"""The feature cache: hits and misses, corruption, concurrency, LRU bound, no pickle; and the Zip
generator through it (cached output identical to uncached, another vocabulary reuses the encoders)."""
import io
import json
import multiprocessing
import os
import pickle
import struct

import numpy as np
import pytest

from conftest import needs_models
from labelgen.errors import GeneratorError, ValidationError
from labelgen.models.feature_cache import MAGIC, TMP_MARK, FeatureCache, cache_key

KEY = {"image_sha256": "ab" * 32, "model": "m", "precision": "fp32", "input_size": 224}


def _cache(tmp_path, max_bytes=10**8, **kw):
    return FeatureCache(tmp_path / "cache", max_bytes, **kw)


# ------------------------------------------------------------------------- basics
@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(10, dtype=np.uint16),
    np.array([True, False]),
    np.array(3.5),  # 0-d
    np.zeros((0, 5), np.int64),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
])
def test_put_then_get_round_trips_exactly(tmp_path, array):
    cache = _cache(tmp_path)
    assert cache.get("tokens", KEY) is None
    assert cache.put("tokens", KEY, array)
    got = cache.get("tokens", KEY)
    assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.corrupt, stats.writes, stats.entries) == (1, 1, 0, 1, 1)
    assert stats.bytes == cache.path_of("tokens", KEY).stat().st_size


def test_the_key_is_canonical_and_kinds_are_separate(tmp_path):
    cache = _cache(tmp_path)
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2}) != cache_key({"a": "2"})
    cache.put("one", KEY, np.ones(3, np.float32))
    assert cache.get("two", KEY) is None and cache.get("one", {**KEY, "precision": "bf16"}) is None
    path = cache.path_of("one", KEY)
    assert path.parent.parent.name == "one" and path.parent.name == cache_key(KEY)[:2]


@pytest.mark.parametrize("kind, key, match", [
    ("tokens", {}, "non-empty dict"),
    ("tokens", {"x": object()}, "JSON values"),
    ("tokens", {"x": float("nan")}, "JSON values"),
    ("../up", KEY, "cache kind"),
    ("", KEY, "cache kind"),
])
def test_bad_keys_and_kinds_are_refused(tmp_path, kind, key, match):
    with pytest.raises(ValidationError, match=match):
        _cache(tmp_path).put(kind, key, np.ones(2))


@pytest.mark.parametrize("value", [np.array([{"a": 1}], dtype=object), [1, 2], np.array(["text"])])
def test_object_and_non_numeric_arrays_are_refused_on_put(tmp_path, value):
    with pytest.raises(ValidationError):
        _cache(tmp_path).put("tokens", KEY, value)


# --------------------------------------------------------------------- corruption
def _rewrite(path, edit_header=None, payload=None):
    """Rebuild an entry file with an edited header and/or another payload (sha kept consistent)."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(data[start:start + length])
    body = data[start + length:] if payload is None else payload
    if payload is not None:
        import hashlib

        header.update(npy_bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(raw)) + raw + body)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header_byte(path):
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 8 + 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_shape(path):
    _rewrite(path, edit_header=lambda h: h.update(shape=[4, 6]))


def _wrong_dtype(path):
    _rewrite(path, edit_header=lambda h: h.update(dtype="<f8"))


def _other_key(path):
    _rewrite(path, edit_header=lambda h: h.update(key=json.dumps({"other": 1})))


def _not_an_entry(path):
    path.write_bytes(b"\x93NUMPY garbage")


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _flip_header_byte, _wrong_shape, _wrong_dtype,
                                    _other_key, _not_an_entry, _empty])
def test_a_damaged_entry_is_detected_deleted_and_recomputed(tmp_path, damage):
    cache = _cache(tmp_path)
    array = np.arange(24, dtype=np.float32).reshape(3, 8)
    cache.put("layer3", KEY, array)
    path = cache.path_of("layer3", KEY)
    damage(path)
    assert cache.get("layer3", KEY) is None  # never raises
    assert not path.exists()
    stats = cache.stats()
    assert (stats.corrupt, stats.misses, stats.hits) == (1, 1, 0)
    cache.put("layer3", KEY, array)  # what a caller does after a miss
    assert np.array_equal(cache.get("layer3", KEY), array)
    assert cache.stats().hits == 1


class _Trap:
    """Unpickling this would flip a flag: proves no entry is ever unpickled."""

    triggered = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.triggered = True
    return "sprung"


def test_an_entry_holding_a_pickled_object_array_is_refused_without_unpickling(tmp_path):
    cache = _cache(tmp_path)
    cache.put("tokens", KEY, np.zeros(1, np.float32))
    path = cache.path_of("tokens", KEY)
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Trap()], dtype=object), allow_pickle=True)
    assert b"_spring" in buffer.getvalue()  # the payload really carries a pickle
    _rewrite(path, edit_header=lambda h: h.update(shape=[1], dtype="|O"), payload=buffer.getvalue())
    assert cache.get("tokens", KEY) is None
    assert not _Trap.triggered and not path.exists() and cache.stats().corrupt == 1
    assert pickle.loads(pickle.dumps(_Trap())) == "sprung"  # the trap works when unpickled


# -------------------------------------------------------------------- concurrency
def _writer(root, worker, start, rounds, max_bytes):
    """Child process: put a shared key (worker-specific content) and its own keys, read back."""
    cache = FeatureCache(root, max_bytes, rescan_every=4)
    start.wait()
    for i in range(rounds):
        cache.put("shared", {"i": i}, np.full((32, 32), worker, np.float32))
        cache.put("own", {"worker": worker, "i": i}, np.arange(1024, dtype=np.float32) + worker)
        got = cache.get("shared", {"i": i})
        if got is not None and not (got == got.flat[0]).all():
            raise SystemExit(3)
    raise SystemExit(1 if cache.stats().corrupt else 0)


def _run_writers(root, rounds, max_bytes):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(root, w, start, rounds, max_bytes)) for w in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    return [proc.exitcode for proc in procs]


def test_concurrent_writers_leave_only_valid_entries(tmp_path):
    root = tmp_path / "cache"
    assert _run_writers(root, rounds=40, max_bytes=10**8) == [0, 0]
    cache = FeatureCache(root, 10**8)
    for i in range(40):
        shared = cache.get("shared", {"i": i})
        assert shared is not None and shared.flat[0] in (0, 1) and (shared == shared.flat[0]).all()
        for worker in (0, 1):
            assert np.array_equal(cache.get("own", {"worker": worker, "i": i}),
                                  np.arange(1024, dtype=np.float32) + worker)
    assert cache.stats().corrupt == 0 and cache.stats().entries == 40 * 3
    assert not [p for p in root.rglob("*") if TMP_MARK in p.name]


def test_concurrent_writers_evicting_the_same_files_do_not_fail(tmp_path):
    root = tmp_path / "cache"
    max_bytes = 40_000  # about 8 entries of ~4.3 kB each: both workers evict all the time
    assert _run_writers(root, rounds=40, max_bytes=max_bytes) == [0, 0]
    cache = FeatureCache(root, max_bytes)
    entry = 4_500  # upper bound of one entry's file size here
    # Each worker scans at least every rescan_every=4 writes: the overshoot is bounded.
    assert cache.stats().bytes <= max_bytes + 2 * 4 * entry
    for path in root.rglob("*.feat"):  # whatever survived is whole
        kind = path.parent.parent.name
        assert kind in ("shared", "own") and path.stat().st_size < entry
    cache.evict()
    assert cache.stats().bytes <= max_bytes and cache.stats().evictions >= 0
    for i in range(40):
        for kind, key in (("shared", {"i": i}), ("own", {"worker": 0, "i": i}), ("own", {"worker": 1, "i": i})):
            cache.get(kind, key)
    assert cache.stats().corrupt == 0 and cache.stats().hits == cache.stats().entries


# ----------------------------------------------------------------------- eviction
def test_eviction_keeps_the_total_under_max_bytes_and_drops_the_least_recently_used(tmp_path):
    array = np.zeros(1000, np.float32)
    probe = _cache(tmp_path / "probe")
    probe.put("x", {"i": 0}, array)
    entry = probe.stats().bytes
    cache = _cache(tmp_path, max_bytes=5 * entry, low_water=1.0)
    for i in range(5):
        cache.put("x", {"i": i}, array)
        os.utime(cache.path_of("x", {"i": i}), ns=(10**9 * (i + 1),) * 2)  # distinct, increasing
    assert cache.stats().entries == 5 and cache.stats().evictions == 0
    assert cache.get("x", {"i": 0}) is not None  # a hit makes entry 0 the most recent
    for i in range(5, 8):
        cache.put("x", {"i": i}, array)
        assert cache.stats().bytes <= cache.max_bytes
    survivors = {i for i in range(8) if cache.path_of("x", {"i": i}).exists()}
    assert survivors == {0, 4, 5, 6, 7}  # 1, 2, 3 were the least recently used
    assert cache.stats().evictions == 3


def test_low_water_frees_headroom(tmp_path):
    array = np.zeros(1000, np.float32)
    cache = _cache(tmp_path, max_bytes=40_000, low_water=0.5)
    for i in range(20):
        cache.put("x", {"i": i}, array)
        if cache.stats().evictions:
            break
    assert cache.stats().evictions > 1 and cache.stats().bytes <= 0.5 * cache.max_bytes


def test_an_array_larger_than_the_cache_is_not_stored(tmp_path, caplog):
    cache = _cache(tmp_path, max_bytes=1000)
    assert cache.put("x", KEY, np.zeros(1000, np.float32)) is False
    assert cache.get("x", KEY) is None and "exceeds max_bytes" in caplog.text


def test_a_failed_write_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    import errno

    import labelgen.models.feature_cache as fc

    def disk_full(path, blob):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fc, "_write_atomic", disk_full)
    cache = _cache(tmp_path)
    assert cache.put("x", KEY, np.ones(3)) is False
    assert "No space left" in caplog.text and cache.stats().writes == 0


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    cache = _cache(tmp_path)
    cache.put("x", KEY, np.ones(3))
    folder = cache.path_of("x", KEY).parent
    stale, fresh = folder / f"dead{TMP_MARK}1-aa", folder / f"live{TMP_MARK}2-bb"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    assert cache.stats().entries == 1
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("max_bytes, low_water", [(0, 0.9), (-5, 0.9), (10, 0.0), (10, 1.5)])
def test_bad_bounds_are_refused(tmp_path, max_bytes, low_water):
    with pytest.raises(ValidationError):
        FeatureCache(tmp_path, max_bytes, low_water=low_water)


# --------------------------------------------------------------- the zip generator
TINY_IMAGE = "000000000009.jpg"


def _zip(*overrides):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    from conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "zip-tiny-random.yaml", list(overrides))
    return GENERATORS.get("zip").from_config(recipe.generator.params)


def _load(coco128_images, name=TINY_IMAGE):
    from labelgen.engine.decode import read_image_rgb
    from labelgen.structures.instances import ImageRecord

    image, info = read_image_rgb(str(coco128_images / name))
    return image, ImageRecord(name, str(coco128_images / name), info["width"], info["height"])


@pytest.mark.parametrize("overrides", [(), ("generator.boundary.init=semantic",), ("generator.precision=bf16",)])
@needs_models
def test_zip_cached_output_is_identical_to_uncached(tmp_path, coco128_images, overrides):
    image, record = _load(coco128_images)
    uncached = _zip(*overrides).generate(image, record).to_dict()
    generator = _zip(*overrides)
    generator.feature_cache = cache = _cache(tmp_path)
    first = generator.generate(image, record).to_dict()
    after_first = cache.stats()
    assert (after_first.hits, after_first.misses, after_first.writes, after_first.entries) == (0, 3, 3, 3)
    assert sorted(p.name for p in cache.root.iterdir()) == ["clip_layer3", "clip_surgery_tokens", "sam_embedding"]
    second = generator.generate(image, record).to_dict()
    assert cache.stats().hits == 3 and cache.stats().misses == 3
    assert len(uncached["masks_rle"]) > 0
    assert first == second == uncached


@needs_models
def test_another_vocabulary_reuses_the_encoders(tmp_path, coco128_images):
    image, record = _load(coco128_images)
    warm = _zip()
    warm.feature_cache = _cache(tmp_path)
    warm.generate(image, record)
    vocab = ("generator.semantic.vocabulary=[a, b]", "generator.semantic.class_threshold=0.2")
    uncached = _zip(*vocab).generate(image, record).to_dict()
    generator = _zip(*vocab)
    generator.feature_cache = cache = _cache(tmp_path)  # same folder, fresh counters
    out = generator.generate(image, record).to_dict()
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.writes) == (3, 0, 0)  # tokens, layer3 and SAM all reused
    assert len(uncached["masks_rle"]) > 0 and out == uncached


@needs_models
def test_cache_keys_follow_encoder_settings_only():
    from labelgen.config import load_recipe
    from labelgen.generators.zip.generator import ZipGenerator

    from conftest import REPO

    def keys(*overrides, image=np.zeros((4, 6, 3), np.uint8), facts=None):
        config = load_recipe(REPO / "recipes" / "zip-tiny-random.yaml", list(overrides)).generator.params
        facts = facts or {"device": "cpu", "semantic": {"weights": "RANDOM"}, "boundary": {"weights": "RANDOM"},
                          "sam": {"weights": "RANDOM"}}
        return ZipGenerator(config, None, None, None, facts).cache_keys(image)

    base = keys()
    assert set(base) == {"clip_surgery_tokens", "clip_layer3", "sam_embedding"}
    for downstream in ("generator.semantic.vocabulary=[x]", "generator.semantic.top_k=1",
                       "generator.boundary.num_clusters=3", "generator.discovery.min_cells=9",
                       "generator.sam.multimask_output=true", "generator.boundary.init=semantic"):
        assert keys(downstream) == base, downstream
    changed = {
        "generator.semantic.input_size=112": {"clip_surgery_tokens"},
        "generator.semantic.surgery_depth=2": {"clip_surgery_tokens"},
        "generator.semantic.new_path_start=zeros": {"clip_surgery_tokens"},
        "generator.boundary.short_side=128": {"clip_layer3"},
        "generator.boundary.max_long_side=300": {"clip_layer3"},
        "generator.precision=bf16": set(base),
    }
    for override, kinds in changed.items():
        other = keys(override)
        assert {k for k in base if cache_key(base[k]) != cache_key(other[k])} == kinds, override
    assert all(keys(image=np.ones((4, 6, 3), np.uint8))[k] != base[k] for k in base)
    assert all(keys(image=np.zeros((6, 4, 3), np.uint8))[k] != base[k] for k in base)
    on_gpu = {"device": "cuda:0", **{s: {"weights": "RANDOM"} for s in ("semantic", "boundary", "sam")}}
    assert all(keys(facts=on_gpu)[k] != base[k] for k in base)


@needs_models
def test_weights_identity(tmp_path):
    from labelgen.generators.zip.generator import weights_identity

    assert weights_identity({"weights": "RANDOM"}, "sam") == {"random_seed": 0}
    assert weights_identity({"weights": "/x/sam.pth", "sha256": "f" * 64}, "sam") == {"sha256": "f" * 64}
    weights = tmp_path / "rn.pt"
    weights.write_bytes(b"1234")
    ident = weights_identity({"weights": str(weights), "pretrained": "openai"}, "boundary")
    assert ident["size"] == 4 and ident["path"] == str(weights) and ident["pretrained"] == "openai"
    os.utime(weights, ns=(5, 5))
    assert weights_identity({"weights": str(weights)}, "boundary")["mtime_ns"] == 5
    with pytest.raises(GeneratorError, match="cannot identify the semantic weights"):
        weights_identity({"weights": str(tmp_path / "gone.pt")}, "semantic")


def test_sam_embedding_survives_bfloat16():
    torch = pytest.importorskip("torch")
    from labelgen.generators.zip.refine import host_to_tensor, tensor_to_host

    for tensor in (torch.randn(1, 4, 2, 2).bfloat16(), torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2).half()):
        array = tensor_to_host(tensor)
        back = host_to_tensor(array)
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)


@needs_models
def test_run_with_cache_dir_reuses_encoder_outputs_and_gives_identical_rows(tmp_path):
    """`execution.cache_dir` through `labelgen run`: a second run (another vocabulary) hits the cache."""
    from conftest import COCO128, REPO
    from labelgen.cli import main
    from labelgen.store.run_store import RunStore

    images = COCO128 / "images" / "train2017"
    if not images.is_dir():
        pytest.skip("coco128-seg not found")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{images / n}\n" for n in ("000000000009.jpg", "000000000025.jpg")))
    cache = tmp_path / "cache"
    base = ["run", str(REPO / "recipes/zip-tiny-random.yaml"), "--images", str(listing), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--out", str(tmp_path / "cold"), "--cache-dir", str(cache)]) == 0
    entries = sorted(p.relative_to(cache).parts[0] for p in cache.rglob("*.feat"))
    assert "clip_surgery_tokens" in entries and "clip_layer3" in entries
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.feat")}
    assert main(base + ["--out", str(tmp_path / "warm"), "--cache-dir", str(cache)]) == 0
    assert set(cache.rglob("*.feat")) == set(before)  # nothing new: every encoder output came from the cache
    rows = [list(RunStore(tmp_path / name).iter_rows()) for name in ("plain", "cold", "warm")]
    assert rows[0] == rows[1] == rows[2]
