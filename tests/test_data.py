"""Data: the built-in set, class subsets, the 80/20 split and sharded batch order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fbnet_fast.search import data as D


def _folder(root, classes=5, per_class=10, val_per_class=2, size=20):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img_{i}.png")
    return root


def test_builtin_is_deterministic_balanced_and_normalised():
    x1, y1 = D.make_builtin(200, seed=3)
    x2, y2 = D.make_builtin(200, seed=3)
    x3, _ = D.make_builtin(200, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (200, 3, 32, 32) and x1.dtype == torch.float32
    assert torch.bincount(y1, minlength=10).tolist() == [20] * 10
    assert abs(float(x1.mean())) < 0.5 and 0.5 < float(x1.std()) < 2.0


def test_builtin_classes_differ_in_shape_and_texture():
    # The mean image of a class is not the whole story, but two classes with the same
    # shape and different textures must differ in high-frequency energy.
    x, y = D.make_builtin(2000, seed=0, noise=0.0)
    hf = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    stripes, checker = hf[y % 2 == 0].mean(), hf[y % 2 == 1].mean()
    assert not torch.isclose(stripes, checker, rtol=0.02)


def test_builtin_data_split_and_subset():
    d = D.builtin_data(seed=1, train_size=500, val_size=100, classes=4)
    xt, yt = d.train
    assert d.num_classes == 4 and set(yt.tolist()) == set(range(4))
    w, t = set(d.weight_idx.tolist()), set(d.theta_idx.tolist())
    assert not w & t and w | t == set(range(len(yt)))
    assert 0.17 < len(t) / len(yt) < 0.23
    assert d.classes == D.builtin_data(seed=1, train_size=500, val_size=100, classes=4).classes


def test_choose_classes_reproducible_and_validated():
    names = [f"n{i:03d}" for i in range(100)]
    a = D.choose_classes(names, 10, seed=0)
    assert a == D.choose_classes(names, 10, seed=0) and len(set(a)) == 10
    assert a != D.choose_classes(names, 10, seed=1)
    assert D.choose_classes(names, None, 0) == sorted(names)
    with pytest.raises(ValueError, match="classes"):
        D.choose_classes(names, 101, 0)


def test_folder_subset_split_disjoint_reproducible_covering(tmp_path):
    root = _folder(tmp_path / "data")
    d1 = D.folder_data(root, classes=3, seed=7, resolution=16)
    d2 = D.folder_data(root, classes=3, seed=7, resolution=16)
    assert d1.classes == d2.classes and len(d1.classes) == 3
    assert set(d1.classes) <= {f"class_{c}" for c in range(5)}
    # Only the kept classes were walked; every one of their images is in exactly one split.
    assert len(d1.train) == 30 and set(d1.train.targets) == {0, 1, 2}
    for i, (path, target) in enumerate(d1.train.samples):
        assert path.split("/")[-2] == d1.classes[target]
    w, t = set(d1.weight_idx.tolist()), set(d1.theta_idx.tolist())
    assert not w & t and w | t == set(range(30))
    per_class_theta = np.bincount([d1.train.targets[i] for i in t], minlength=3)
    assert per_class_theta.tolist() == [2, 2, 2]                  # 20 % of 10, stratified
    assert torch.equal(d1.theta_idx, d2.theta_idx)
    others = [D.folder_data(root, classes=3, seed=s, resolution=16) for s in (8, 9, 10)]
    assert any(not torch.equal(o.theta_idx, d1.theta_idx) or o.classes != d1.classes
               for o in others)
    assert len(d1.val) == 6 and set(d1.val.targets) == {0, 1, 2}
    x, y = next(D.batches(d1.train, d1.weight_idx, 4, seed=0, epoch=0, stream=0, workers=0))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)


def test_batch_order_is_a_function_of_seed_and_epoch_and_shards_disjoint():
    idx = torch.arange(100, 200)
    a = D.shard(idx, 8, seed=0, epoch=3, stream=0)
    assert torch.equal(a, D.shard(idx, 8, seed=0, epoch=3, stream=0))
    assert not torch.equal(a, D.shard(idx, 8, seed=0, epoch=4, stream=0))
    r0 = D.shard(idx, 8, seed=0, epoch=3, stream=0, rank=0, world=2)
    r1 = D.shard(idx, 8, seed=0, epoch=3, stream=0, rank=1, world=2)
    assert r0.shape == r1.shape == (6, 8)
    assert not set(r0.flatten().tolist()) & set(r1.flatten().tolist())
    assert set(r0.flatten().tolist()) | set(r1.flatten().tolist()) <= set(idx.tolist())


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.folder_data(tmp_path / "nope")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        D.folder_data(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="train/"):
        D.folder_data(tmp_path / "flat")


def test_undecodable_image_is_named_or_skipped(tmp_path):
    root = _folder(tmp_path / "data", classes=2, per_class=4, val_per_class=1)
    bad = root / "train" / "class_0" / "img_1.png"
    bad.write_bytes(b"not an image")
    d = D.folder_data(root, resolution=16)
    with pytest.raises(D.BadImageError, match=f"cannot decode image {bad} .*--skip-bad-images"):
        list(D.batches(d.train, torch.arange(8), 4, seed=0, epoch=0, stream=0, workers=1))
    d = D.folder_data(root, resolution=16, skip_bad_images=True)
    got = list(D.batches(d.train, torch.arange(8), 4, seed=0, epoch=0, stream=0, workers=0))
    assert sorted(len(y) for _, y in got) == [3, 4]
    assert d.train.skipped == [str(bad)] and D.skipped_images(d) == 1


def test_batches_from_a_start_step_continue_the_same_order():
    x, y = torch.arange(40.0).view(40, 1), torch.arange(40)
    full = [b for _, b in D.batches((x, y), torch.arange(40), 8, seed=0, epoch=2, stream=0)]
    tail = [b for _, b in D.batches((x, y), torch.arange(40), 8, seed=0, epoch=2, stream=0,
                                    start=2)]
    assert len(tail) == 3 and [t.tolist() for t in tail] == [f.tolist() for f in full[2:]]
