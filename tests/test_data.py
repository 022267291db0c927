"""The task-balanced sampler and the evaluation stream."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data import (
    DataConfigError,
    EvalStream,
    ShuffledSamples,
    TaskBalancedStream,
    augment_batch,
    compute_quotas,
    data_error_line,
    decode_image,
    decode_images,
    decode_jpeg,
    eval_loader,
    expected_labelled_per_batch,
    label_values,
    open_shard_set,
    resolve_tasks,
    stream_seed,
    tar_samples,
    train_loader,
)
from pipeline.schema import get_task
from pipeline.tar_format import tar_end, tar_member_bytes

TASKS = ["age", "gender", "race", "smile", "young", "emotion"]
DISJOINT = {"utk": {"age": 1, "gender": 1, "race": 1}, "fer": {"emotion": 1},
            "celeba": {"gender": 1, "smile": 1, "young": 1}}


def test_quotas_give_every_task_an_equal_floor_of_labelled_examples() -> None:
    quotas = compute_quotas(DISJOINT, TASKS, 60)
    # age only in utk, emotion only in fer, smile only in celeba: the best floor is 20 each.
    assert quotas == {"utk": 20, "fer": 20, "celeba": 20}
    expected = expected_labelled_per_batch(quotas, DISJOINT, TASKS)
    assert expected["gender"] == 40 and min(expected.values()) == 20


def test_quotas_follow_target_shares_and_partial_coverage() -> None:
    quotas = compute_quotas({"a": {"age": 1.0}, "b": {"emotion": 0.5}}, ["age", "emotion"], 30)
    assert quotas == {"a": 10, "b": 20}  # b labels emotion on half its samples: 10 = 20 * 0.5
    shares = compute_quotas({"a": {"age": 1.0}, "b": {"emotion": 1.0}}, ["age", "emotion"], 40,
                            {"age": 3, "emotion": 1})
    assert shares == {"a": 30, "b": 10}


def test_quotas_always_sum_to_the_batch_size() -> None:
    for batch in (7, 31, 64, 100):
        assert sum(compute_quotas(DISJOINT, TASKS, batch).values()) == batch


def test_a_dataset_without_requested_tasks_or_a_task_without_dataset_is_an_error() -> None:
    with pytest.raises(DataConfigError, match="dataset 'fer' labels none of the tasks"):
        compute_quotas(DISJOINT, ["age", "gender"], 32)
    with pytest.raises(DataConfigError, match="no dataset labels task 'emotion'"):
        compute_quotas({"utk": DISJOINT["utk"]}, ["age", "emotion"], 32)


def test_resolve_tasks_names_the_uncovered_task(synthetic_shards: dict[str, Path]) -> None:
    sets = [open_shard_set(synthetic_shards["fer"])]
    assert resolve_tasks(sets, []) == ["emotion"]
    with pytest.raises(DataConfigError, match="task 'age' has no labelled training sample"):
        resolve_tasks(sets, ["age"])


def test_achieved_task_shares_match_the_quotas_over_many_batches(synthetic_shards: dict[str, Path]) -> None:
    sets = [open_shard_set(p) for p in synthetic_shards.values()]
    coverage = {s.name: {t: s.labelled_fraction(t) for t in TASKS} for s in sets}
    quotas = compute_quotas(coverage, TASKS, 30)
    stream = TaskBalancedStream(sets, quotas, TASKS, 32, shuffle_buffer=50, seed=0)
    labelled = torch.zeros(len(TASKS))
    sources = torch.zeros(len(sets))
    batches = list(itertools.islice(iter(train_loader(stream, loader_workers=2)), 40))
    for batch in batches:
        assert batch["images"].shape == (30, 3, 32, 32) and batch["images"].dtype == torch.uint8
        labelled += batch["mask"].sum(dim=0)
        sources += torch.bincount(batch["source"], minlength=len(sets))
    assert sources.tolist() == [q * 40 for q in quotas.values()]  # every batch exactly the quotas
    expected = expected_labelled_per_batch(quotas, coverage, TASKS)
    assert (labelled / 40).tolist() == pytest.approx([expected[t] for t in TASKS], abs=1e-6)


def test_streams_differ_by_rank_and_epoch_and_repeat_for_the_same_seed(synthetic_shards: dict[str, Path]) -> None:
    sets = [open_shard_set(synthetic_shards["utk"])]
    def first_batch(rank: int, epoch: int) -> torch.Tensor:
        stream = TaskBalancedStream(sets, {"utk": 8}, ["age"], 32, 50, seed=3, rank=rank, epoch=epoch)
        return next(iter(stream))["labels"]
    assert torch.equal(first_batch(0, 0), first_batch(0, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))


@pytest.mark.parametrize("buffer_size", [1, 7, 100, 500])
def test_shuffled_samples_come_in_webdatasets_shuffle_order_for_the_seed(buffer_size: int) -> None:
    expected = wds.shuffle(buffer_size, initial=min(buffer_size, 100), seed=11)(iter(range(10**6)))
    shuffled = ShuffledSamples(iter(range(10**6)), buffer_size, seed=11)
    taken = [sample for count in [1, 64, 3, 30, 200, 2] * 3 for sample in shuffled.take(count)]
    assert taken == list(itertools.islice(expected, len(taken)))


def test_training_batches_hold_webdatasets_resampled_and_shuffled_samples_for_the_seed(
        synthetic_shards: dict[str, Path]) -> None:
    """The stream's own reading equals the plain pipeline: resampled shards, every member, labels from each
    sample's json, webdataset's shuffle."""
    shard_set = open_shard_set(synthetic_shards["celeba"])
    tasks = ["gender", "smile", "young"]
    stream = TaskBalancedStream([shard_set], {"celeba": 8}, tasks, 32, shuffle_buffer=40, seed=5, rank=1, epoch=2)
    seed = stream_seed(5, 1, 0, 2, "celeba")
    by_url = {shard["url"]: shard for shard in shard_set.shards("train")}
    picked = wds.ResampledShards(list(by_url), seed=seed, worker_seed=lambda: 0, deterministic=True)
    samples = (sample for pick in picked for sample in tar_samples([by_url[pick["url"]]]))
    expected = wds.shuffle(40, initial=40, seed=seed)(samples)
    for batch in itertools.islice(iter(stream), 30):  # several passes over the 4 shards
        chosen = list(itertools.islice(expected, 8))
        images = torch.stack([decode_image(sample["jpg"], 32) for sample in chosen])
        labels = [label_values(json.loads(sample["json"])["labels"], [get_task(t) for t in tasks]) for sample in chosen]
        assert torch.equal(batch["images"], images)
        assert batch["labels"].tolist() == [targets for targets, _ in labels]
        assert batch["mask"].tolist() == [mask for _, mask in labels]


def test_validation_reads_every_sample_exactly_once_across_two_ranks_and_two_workers(
        synthetic_shards: dict[str, Path]) -> None:
    sets = [open_shard_set(p) for p in synthetic_shards.values()]
    expected = sum(s.num_samples("val") for s in sets)
    keys: list[str] = []
    for rank in range(2):
        loader = eval_loader(EvalStream(sets, "val", TASKS, 32, rank=rank, world_size=2), batch_size=16,
                             loader_workers=2)
        for batch in loader:
            keys.extend(batch["key"])
    assert len(keys) == expected and len(set(keys)) == expected


def test_reading_a_shard_checks_its_size_and_sample_count_against_its_index_entry(tmp_path: Path) -> None:
    tar = tmp_path / "val-000000.tar"
    tar.write_bytes(b"".join(tar_member_bytes(f"s{i}.{suffix}", b"{}") for i in range(2) for suffix in ("jpg", "json"))
                    + tar_end())
    entry = {"url": str(tar), "nsamples": 2, "filesize": tar.stat().st_size, "index": "val.json"}
    assert [s["__key__"] for s in tar_samples([entry])] == ["s0", "s1"]
    with pytest.raises(DataConfigError, match=f"{tar} holds 2 samples, val.json records 3"):
        list(tar_samples([{**entry, "nsamples": 3}]))
    with pytest.raises(DataConfigError, match=f"{tar} is truncated at byte {entry['filesize']}: val.json records"):
        list(tar_samples([{**entry, "filesize": entry["filesize"] + 512}]))


def test_validation_stream_stops_at_a_damaged_shard_naming_it(synthetic_shards: dict[str, Path],
                                                              tmp_path: Path) -> None:
    folder = Path(shutil.copytree(synthetic_shards["fer"], tmp_path / "fer"))
    tar = folder / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[:512] = b"\x5a" * 512  # the first header overwritten: the size is unchanged, so only reading finds it
    shard_set = open_shard_set(folder)
    tar.write_bytes(bytes(data))
    with pytest.raises(DataConfigError, match=f"{tar} is damaged: the bytes at 0 are not a tar header"):
        list(EvalStream([shard_set], "val", ["emotion"], 32))
    with pytest.raises(DataConfigError) as raised:  # from a loader worker: torch adds the worker's traceback
        list(eval_loader(EvalStream([shard_set], "val", ["emotion"], 32), batch_size=8, loader_workers=1))
    assert data_error_line(raised.value).startswith(f"{tar} is damaged: the bytes at 0 are not a tar header")


def encoded(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def test_decoded_pixels_are_those_pillow_decodes() -> None:
    rng = np.random.default_rng(0)
    jpegs = [encoded(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), quality=quality, subsampling=subsampling)
             for quality, subsampling in ((95, 0), (75, 2), (30, 1))]
    jpegs.append(encoded(rng.integers(0, 256, (40, 40), dtype=np.uint8)))  # grey: the same value in R, G and B
    for jpeg in jpegs:
        expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        assert np.array_equal(decode_jpeg(jpeg), expected)
        assert np.array_equal(decode_jpeg(memoryview(b"\0" + jpeg)[1:]), expected)  # a view, as of a mapped tar


def test_a_batch_holds_each_image_as_decode_image_gives_it_whatever_size_the_shard_stores() -> None:
    rng = np.random.default_rng(1)
    jpegs = [encoded(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for side in (32, 48, 96, 32, 31)]
    batch = decode_images(jpegs, 32)
    assert batch.shape == (5, 32, 32, 3) and batch.dtype == torch.uint8
    for image, jpeg in zip(batch, jpegs):
        assert torch.equal(image.permute(2, 0, 1), decode_image(jpeg, 32))
    with pytest.raises(ValueError):
        decode_images([jpegs[0], b"not a JPEG"], 32)


@pytest.mark.parametrize("image_size", [64, 128])
def test_a_batch_is_decoded_into_rows_that_start_off_16_byte_boundaries(image_size: int) -> None:
    rng = np.random.default_rng(2)
    jpegs = [encoded(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(3)]
    for _ in range(4):  # wherever malloc puts the batch
        batch = decode_images(jpegs, image_size)
        row_starts = batch.data_ptr() + np.arange(0, batch.numel(), image_size * 3)
        assert batch.is_contiguous() and (row_starts % 16 != 0).all()
        assert batch.untyped_storage().nbytes() == batch.numel()  # the spare bytes do not go to shared memory
        for image, jpeg in zip(batch, jpegs):
            assert np.array_equal(image.numpy(), decode_jpeg(jpeg))


def test_augment_batch_is_seeded_keeps_shape_and_is_the_identity_when_off() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    config = AugmentConfig()
    first = augment_batch(images, config, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, augment_batch(images, config, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augment_batch(images, config, torch.Generator().manual_seed(2)))
    assert torch.equal(augment_batch(images, AugmentConfig(enabled=False), torch.Generator()), images)
    still = AugmentConfig(crop_scale=(1.0, 1.0), hflip=False, color_jitter=0.0)
    # full-area crop with aspect 0.9-1.1 clamps to the whole image: (nearly) the input
    assert (augment_batch(images, still, torch.Generator()).int() - images.int()).abs().float().mean() < 40


def test_augment_batch_flips_exactly_when_the_crop_is_the_whole_image() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4) * 2
    config = AugmentConfig(crop_scale=(1.0, 1.0), hflip=True, color_jitter=0.0)
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(images, config, generator)
    for index in range(2):
        assert torch.equal(out[index], images[index]) or torch.equal(out[index], images[index].flip(-1))
