"""examples/: the digits image folder is what --data reads, with a seeded per-class split."""
import importlib.util
from pathlib import Path

import pytest

from fbnet_fast.search.data import folder_data

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_folder_is_a_seeded_per_class_split(tmp_path):
    digits = _load("digits_folder")
    counts = digits.write_digits(str(tmp_path / "a"), size=16, val_fraction=0.2, seed=3)
    assert counts == {"train": 1438, "val": 359}          # all 1,797 images, once each
    data = folder_data(str(tmp_path / "a"), resolution=16)
    assert data.classes == [str(d) for d in range(10)]
    assert len(data.train) == 1438 and len(data.val) == 359
    for d in range(10):                                    # ~20 % of every class in val
        n_val = len(list((tmp_path / "a" / "val" / str(d)).iterdir()))
        n_train = len(list((tmp_path / "a" / "train" / str(d)).iterdir()))
        assert abs(n_val - 0.2 * (n_val + n_train)) <= 0.5
    x, y = data.val[0]
    assert tuple(x.shape) == (3, 16, 16) and x.std() > 0.1  # grey scans as RGB, not blank
    # the split depends on the seed only
    digits.write_digits(str(tmp_path / "b"), size=16, val_fraction=0.2, seed=3)
    names = lambda p: sorted(f.name for f in (p / "val" / "7").iterdir())  # noqa: E731
    assert names(tmp_path / "a") == names(tmp_path / "b")
    digits.write_digits(str(tmp_path / "c"), size=16, val_fraction=0.2, seed=4)
    assert names(tmp_path / "a") != names(tmp_path / "c")
