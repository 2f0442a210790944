"""BatchLoader: cached fast path, DataLoader fallback, seeded order, resume, drop_last."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _fakes import FolderCXR, GeneratedCXR, write_fake_folder
from cxrstudy.data.cache import attach_cache
from cxrstudy.data.loader import BatchLoader, collate_without_meta


@pytest.fixture
def folder(tmp_path):
    return write_fake_folder(tmp_path / "fake", n=12, size=40)


@pytest.fixture
def cached(folder, tmp_path):
    return attach_cache(FolderCXR(folder, image_size=16), cache_dir=tmp_path / "c",
                        progress=False)


def _collect(loader):
    return [dict(batch) for batch in loader]


def test_cached_batches_have_the_contract_shapes_and_values(cached):
    loader = BatchLoader(cached, batch_size=5)
    batches = _collect(loader)
    assert len(loader) == 3 and len(batches) == 3
    assert [b["image"].shape[0] for b in batches] == [5, 5, 2]
    first = batches[0]
    assert set(first) == {"image", "target", "mask", "index"}
    assert first["image"].shape == (5, 1, 16, 16) and first["image"].dtype == torch.float32
    assert first["target"].shape == (5, 3) and first["mask"].shape == (5, 3)
    assert first["index"].dtype == torch.long
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(12))
    for b in batches:
        for k, i in enumerate(b["index"].tolist()):
            item = cached[i]
            assert torch.equal(b["image"][k], item["image"])
            assert torch.equal(b["target"][k], item["target"])
            assert torch.equal(b["mask"][k], item["mask"])
    assert float(first["image"].min()) >= 0.0 and float(first["image"].max()) <= 1.0
    # row 0 has an unknown Gamma label (every fifth row): masked out, target 0
    assert first["mask"][0].tolist() == [1.0, 1.0, 0.0] and first["target"][0, 2] == 0


def test_cached_path_reads_no_files_and_no_items(cached, monkeypatch):
    reads = sum(cached.reads.values())

    def no_items(self, i):
        raise AssertionError("the cached path must not build items one by one")

    monkeypatch.setattr(FolderCXR, "__getitem__", no_items)
    total = sum(b["image"].shape[0] for b in BatchLoader(cached, batch_size=4, shuffle=True))
    assert total == 12 and sum(cached.reads.values()) == reads


def test_fallback_dataloader_gives_the_same_batches_as_the_cache(folder, cached):
    uncached = FolderCXR(folder, image_size=16)
    fast = _collect(BatchLoader(cached, batch_size=5, shuffle=True, seed=3))
    slow = _collect(BatchLoader(uncached, batch_size=5, shuffle=True, seed=3))
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert set(b) == {"image", "target", "mask", "index"}  # meta dropped
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert sum(uncached.reads.values()) == 12


def test_shuffle_is_a_seeded_permutation_per_epoch(cached):
    loader = BatchLoader(cached, batch_size=4, shuffle=True, seed=7)
    epoch0 = torch.cat([b["index"] for b in loader]).tolist()
    again = torch.cat([b["index"] for b in loader]).tolist()
    loader.set_epoch(1)
    epoch1 = torch.cat([b["index"] for b in loader]).tolist()
    other_seed = BatchLoader(cached, batch_size=4, shuffle=True, seed=8)
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 == again
    assert epoch0 != epoch1
    assert torch.cat([b["index"] for b in other_seed]).tolist() != epoch0
    assert loader.order(0).tolist() == epoch0


def test_resume_from_a_batch_continues_the_same_order(cached):
    loader = BatchLoader(cached, batch_size=5, shuffle=True, seed=1)
    loader.set_epoch(4)
    full = _collect(loader)
    loader.set_epoch(4, start_batch=1)
    rest = _collect(loader)
    assert len(rest) == 2
    for a, b in zip(full[1:], rest):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=9)


def test_drop_last_drops_the_short_batch(cached):
    loader = BatchLoader(cached, batch_size=5, shuffle=True, drop_last=True)
    batches = _collect(loader)
    assert len(loader) == 2 and [len(b["index"]) for b in batches] == [5, 5]
    assert len(set(torch.cat([b["index"] for b in batches]).tolist())) == 10


def test_prefetching_threads_give_identical_batches(tmp_path):
    ds = attach_cache(GeneratedCXR(n=50, image_size=16), cache_dir=tmp_path, progress=False)
    plain = _collect(BatchLoader(ds, batch_size=8, shuffle=True, seed=2))
    ahead = _collect(BatchLoader(ds, batch_size=8, shuffle=True, seed=2, num_workers=2))
    assert len(plain) == len(ahead) == 7
    for a, b in zip(plain, ahead):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_stopping_early_with_prefetch_does_not_hang(tmp_path):
    ds = attach_cache(GeneratedCXR(n=50, image_size=16), cache_dir=tmp_path, progress=False)
    iterator = iter(BatchLoader(ds, batch_size=4, num_workers=3))
    first = next(iterator)
    iterator.close()
    assert first["index"].tolist() == [0, 1, 2, 3]


def test_subset_of_a_cached_dataset_reads_its_own_rows(cached):
    sub = cached.subset([9, 2, 5])
    batch = next(iter(BatchLoader(sub, batch_size=3)))
    assert batch["index"].tolist() == [0, 1, 2]
    for k, source_row in enumerate([9, 2, 5]):
        assert torch.equal(batch["image"][k], cached[source_row]["image"])


def test_collate_without_meta_and_bad_arguments(cached):
    batch = collate_without_meta([cached[0], cached[1]])
    assert "meta" not in batch and batch["image"].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(cached, batch_size=0)
    assert np.array_equal(BatchLoader(cached, batch_size=4).order(5), np.arange(12))


def test_cache_of_another_size_is_refused(cached):
    cached.image_size = 32  # the attached cache holds 16 px images
    with pytest.raises(ValueError, match="16 px"):
        next(iter(BatchLoader(cached, batch_size=4)))
