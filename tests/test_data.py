"""cerberus.data: files, download, splits and batch order."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cerberus import data
from cerberus.config import DataConfig
from cerberus.errors import ConfigError, DataError

N_TRAIN, N_TEST = 100, 50  # 5 training batches of 20


def image_rows(first: int, n: int) -> np.ndarray:
    """Rows of known content: image k has byte (k + p) % 256 at flat CHW position p."""
    k = np.arange(first, first + n)[:, None]
    return ((k + np.arange(3072)[None, :]) % 256).astype(np.uint8)


def train_label(k: np.ndarray | int) -> np.ndarray | int:
    return (k * 3) % 10  # balanced: 10 of each class in 100 images


def write_fake_cifar(root: Path) -> Path:
    """``root/cifar-10-batches-py`` in the official layout with N_TRAIN + N_TEST known images."""
    folder = root / data.FOLDER
    folder.mkdir(parents=True)
    per_batch = N_TRAIN // 5
    for b in range(5):
        ks = np.arange(b * per_batch, (b + 1) * per_batch)
        batch = {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": [int(train_label(k)) for k in ks],
            "data": image_rows(b * per_batch, per_batch),
            "filenames": [f"img_{k}.png" for k in ks],
        }
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch, protocol=4))
    test = {"batch_label": "testing batch 1 of 1", "labels": [k % 10 for k in range(N_TEST)]}
    test["data"] = image_rows(1000, N_TEST)
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=4))
    meta = {"label_names": list(data.CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def make_archive(folder_root: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder_root / data.FOLDER, arcname=data.FOLDER)
    return archive


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return write_fake_cifar(tmp_path / "fake")


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CERBERUS_DATA", "CERBERUS_CIFAR10_URL", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------
# Locations


def test_data_root_order(monkeypatch: pytest.MonkeyPatch, no_data_env: None, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_root() == tmp_path / "home" / ".cache" / "cerberus"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_root() == tmp_path / "xdg" / "cerberus"
    assert data.resolve_data_root(None, None) == tmp_path / "xdg" / "cerberus"
    monkeypatch.setenv("CERBERUS_DATA", "/env/data")
    assert data.resolve_data_root(None, None) == Path("/env/data")
    assert data.resolve_data_root(None, "/config/root") == Path("/config/root")
    assert data.resolve_data_root(Path("/flag/dir"), "/config/root") == Path("/flag/dir")
    assert data.resolve_data_root("~/d", None) == tmp_path / "home" / "d"


def test_url_order(monkeypatch: pytest.MonkeyPatch, no_data_env: None) -> None:
    assert data.resolve_url(None) == data.OFFICIAL_URL
    monkeypatch.setenv("CERBERUS_CIFAR10_URL", "file:///env/cifar.tar.gz")
    assert data.resolve_url(None) == "file:///env/cifar.tar.gz"
    assert data.resolve_url("https://mirror/c.tar.gz") == "https://mirror/c.tar.gz"


# --------------------------------------------------------------------------------------------
# Loading


def test_load_official_layout(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root, download=False)
    assert cifar.root == fake_root
    assert cifar.classes == data.CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                             "frog", "horse", "ship", "truck")  # fmt: skip
    assert cifar.train_images.shape == (N_TRAIN, 3, 32, 32) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (N_TEST, 3, 32, 32) and cifar.test_labels.dtype == torch.int64
    assert cifar.train_images.is_contiguous() and cifar.train_images.device.type == "cpu"
    # rows are CHW and batches follow each other: image k, channel c, pixel (y, x) holds
    # (k + 1024c + 32y + x) % 256
    assert int(cifar.train_images[37, 2, 5, 7]) == (37 + 2 * 1024 + 5 * 32 + 7) % 256
    assert torch.equal(cifar.train_images.reshape(N_TRAIN, -1), torch.from_numpy(image_rows(0, N_TRAIN)))
    assert torch.equal(cifar.test_images.reshape(N_TEST, -1), torch.from_numpy(image_rows(1000, N_TEST)))
    assert cifar.train_labels.tolist() == [train_label(k) for k in range(N_TRAIN)]
    assert torch.bincount(cifar.train_labels).tolist() == [10] * 10


def test_load_test_split_only_skips_training_batches(fake_root: Path) -> None:
    (fake_root / data.FOLDER / "data_batch_2").unlink()  # not read, so not missed
    cifar = data.load_cifar10(fake_root, download=False, split="test")
    assert cifar.train_images.shape == (0, 3, 32, 32) and cifar.train_labels.shape == (0,)
    assert cifar.test_images.shape == (N_TEST, 3, 32, 32)
    with pytest.raises(ValueError, match="split"):
        data.load_cifar10(fake_root, split="validation")


def test_root_may_be_the_batches_folder_itself(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root / data.FOLDER, download=False)
    assert cifar.root == fake_root and len(cifar.train_labels) == N_TRAIN


def test_python2_style_pickles_load(fake_root: Path) -> None:
    """The official files are protocol-2 pickles that name numpy.core.multiarray (numpy 1.x)."""
    path = fake_root / data.FOLDER / "test_batch"
    batch = pickle.loads(path.read_bytes())
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    path.write_bytes(raw)
    cifar = data.load_cifar10(fake_root, download=False, split="test")
    assert torch.equal(cifar.test_images.reshape(N_TEST, -1), torch.from_numpy(image_rows(1000, N_TEST)))


class _Exploit:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_that_runs_code_is_refused(fake_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = fake_root / data.FOLDER / "data_batch_4"
    path.write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": []}))
    with pytest.raises(
        DataError,
        match=r"data_batch_4: not a CIFAR-10 file: it refers to io\.open, which could run code",
    ):
        data.load_cifar10(fake_root, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("download", [False, True])
def test_a_file_given_as_the_data_folder_is_named_as_such(tmp_path: Path, download: bool) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(DataError) as err:
        data.load_cifar10(afile, download=download, url="file:///nowhere.tar.gz")
    assert str(err.value) == f"{afile} is a file, not a folder holding cifar-10-batches-py/"


def test_missing_batch_is_named(fake_root: Path) -> None:
    (fake_root / data.FOLDER / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        data.load_cifar10(fake_root, download=True, url="file:///nowhere.tar.gz")  # no download attempt
    assert "data_batch_3 is missing" in str(err.value)
    assert str(fake_root / data.FOLDER) in str(err.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def _rewrite(path: Path, **changes: object) -> None:
    batch = pickle.loads(path.read_bytes())
    batch.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del batch[key]
    path.write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate, "truncated or corrupt"),
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "truncated or corrupt"),
        (lambda p: p.write_bytes(b""), "truncated or corrupt"),
        (lambda p: _rewrite(p, labels=None), "expected the keys 'data' and 'labels'"),
        (lambda p: _rewrite(p, data=np.zeros((N_TEST, 1024), np.uint8)), r"shape \(N, 3072\)"),
        (lambda p: _rewrite(p, data=np.zeros((N_TEST, 3072), np.float32)), "float32"),
        (lambda p: _rewrite(p, labels=[0] * (N_TEST - 1)), "50 images but 'labels'"),
        (lambda p: _rewrite(p, labels=[12] * N_TEST), r"labels must be in 0\.\.9, found 12"),
        (lambda p: _rewrite(p, labels=["cat"] * N_TEST), "list of integers"),
    ],
)
def test_corrupt_test_batch_is_named(fake_root: Path, corrupt, message: str) -> None:
    corrupt(fake_root / data.FOLDER / "test_batch")
    with pytest.raises(DataError, match=message) as err:
        data.load_cifar10(fake_root, download=False)
    assert str(fake_root / data.FOLDER / "test_batch") in str(err.value)


def test_a_batch_pickled_with_bytes_keys_reads_like_the_official_one(fake_root: Path) -> None:
    meta = fake_root / data.FOLDER / "batches.meta"
    names = pickle.loads(meta.read_bytes())
    meta.write_bytes(pickle.dumps({key.encode(): value for key, value in names.items()}))
    path = fake_root / data.FOLDER / "test_batch"
    batch = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({key.encode(): value for key, value in batch.items()}))
    assert torch.equal(
        data.load_cifar10(fake_root, download=False).test_labels, torch.tensor(batch["labels"])
    )
    # and what is wrong with it is then named, not its keys
    path.write_bytes(pickle.dumps({b"data": np.zeros((N_TEST, 3000), np.uint8), b"labels": batch["labels"]}))
    with pytest.raises(DataError, match=r"shape \(N, 3072\), got uint8 \(50, 3000\)"):
        data.load_cifar10(fake_root, download=False)


def test_wrong_class_names_are_refused(fake_root: Path) -> None:
    meta = fake_root / data.FOLDER / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["apple", "aquarium_fish"]}))
    with pytest.raises(DataError, match=r"batches\.meta: the class names are \['apple'"):
        data.load_cifar10(fake_root, download=False)


# --------------------------------------------------------------------------------------------
# Download


def test_download_through_file_url(fake_root: Path, tmp_path: Path) -> None:
    archive = make_archive(fake_root, tmp_path / "cifar-10-python.tar.gz")
    dest = tmp_path / "cache" / "cerberus"
    cifar = data.load_cifar10(dest, download=True, url=archive.as_uri())
    assert cifar.root == dest
    assert sorted(p.name for p in dest.iterdir()) == [data.FOLDER]  # no archive, no staging left
    expected = data.load_cifar10(fake_root, download=False)
    assert torch.equal(cifar.train_images, expected.train_images)
    assert torch.equal(cifar.test_labels, expected.test_labels)
    # a bare path to the archive is taken as a file:// URL
    assert len(data.load_cifar10(tmp_path / "other", url=str(archive)).train_labels) == N_TRAIN


def test_an_archive_escaping_its_folder_is_refused(fake_root: Path, tmp_path: Path) -> None:
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_root / data.FOLDER, arcname=data.FOLDER)
        evil = tmp_path / "evil.txt"
        evil.write_text("written outside the data folder")
        tar.add(evil, arcname="../escaped.txt")
    dest = tmp_path / "deep" / "cache"
    with pytest.raises(DataError, match="could not download CIFAR-10"):
        data.load_cifar10(dest, url=archive.as_uri())
    assert list(tmp_path.rglob("escaped.txt")) == []
    assert not (dest / data.FOLDER).exists()


def test_download_url_from_environment(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_archive(fake_root, tmp_path / "mirror.tar.gz")
    monkeypatch.setenv("CERBERUS_CIFAR10_URL", archive.as_uri())
    assert len(data.load_cifar10(tmp_path / "dest").test_labels) == N_TEST


def test_absent_without_download(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        data.load_cifar10(root, download=False)
    message = str(err.value)
    assert f"{root / data.FOLDER}/ does not exist" in message
    assert "data.url" in message and "CERBERUS_CIFAR10_URL" in message and "data.download" in message
    assert not root.exists()


def test_failed_download_names_url_mirror_option_and_folder(tmp_path: Path) -> None:
    url = (tmp_path / "no-such-archive.tar.gz").as_uri()
    root = tmp_path / "dest"
    with pytest.raises(DataError) as err:
        data.load_cifar10(root, download=True, url=url)
    message = str(err.value)
    assert message.startswith(f"could not download CIFAR-10 from {url} (No such file or directory)")
    assert "data.url" in message and "CERBERUS_CIFAR10_URL" in message
    assert f"by hand in {root / data.FOLDER}/" in message
    assert not root.exists()  # neither the staging folder nor the folder made for it remain


def test_failed_download_removes_only_the_folders_it_made(tmp_path: Path) -> None:
    url = (tmp_path / "no-such-archive.tar.gz").as_uri()
    with pytest.raises(DataError):
        data.load_cifar10(tmp_path / "a" / "b" / "dest", download=True, url=url)
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError):
        data.load_cifar10(kept, download=True, url=url)
    assert kept.is_dir() and list(kept.iterdir()) == []  # it was there before: it stays, empty


@pytest.mark.parametrize(
    "url",
    [
        "not a url at all",
        "ftp://127.0.0.1:9/cifar-10-python.tar.gz",
        "http://127.0.0.1:9/cifar-10-python.tar.gz",
    ],
)
def test_unusable_url_is_one_data_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(DataError, match=r"(?s)could not download CIFAR-10 from .*data\.url"):
        data.load_cifar10(tmp_path / "dest", url=url)


def test_archive_that_is_not_cifar(tmp_path: Path) -> None:
    not_gzip = tmp_path / "junk.tar.gz"
    not_gzip.write_bytes(b"this is not a gzip file" * 10)
    with pytest.raises(DataError, match="could not download CIFAR-10 from"):
        data.load_cifar10(tmp_path / "a", url=not_gzip.as_uri())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hello")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    with pytest.raises(DataError, match="the archive holds no cifar-10-batches-py/ folder"):
        data.load_cifar10(tmp_path / "b", url=(tmp_path / "other.tar.gz").as_uri())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind


# --------------------------------------------------------------------------------------------
# Splits


def _class_counts(labels: torch.Tensor, idx: torch.Tensor, classes: int) -> list[int]:
    return torch.bincount(labels[idx], minlength=classes).tolist()


def test_stratified_split_balanced() -> None:
    labels = torch.arange(100) % 10
    train_idx, val_idx = data.stratified_split(labels, 20, seed=3)
    assert _class_counts(labels, val_idx, 10) == [2] * 10
    assert _class_counts(labels, train_idx, 10) == [8] * 10
    # 25 = 10 * 2.5: the five leftover images go to the smallest labels (equal remainders)
    _, val_idx = data.stratified_split(labels, 25, seed=3)
    assert _class_counts(labels, val_idx, 10) == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]


def test_stratified_split_unbalanced() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator())]
    _, val_idx = data.stratified_split(labels, 10, seed=0)
    assert _class_counts(labels, val_idx, 3) == [5, 3, 2]
    # exact shares 3.5, 1.0, 0.5: floors 3, 1, 0; the one left over goes to the larger remainder,
    # ties to the smaller label
    labels = torch.tensor([4] * 7 + [7] * 2 + [9] * 1)
    _, val_idx = data.stratified_split(labels, 5, seed=1)
    counts = _class_counts(labels, val_idx, 10)
    assert (counts[4], counts[7], counts[9]) == (4, 1, 0)
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    _, val_idx = data.stratified_split(labels, 5, seed=1)  # shares 3.0, 1.5, 0.5
    assert _class_counts(labels, val_idx, 3) == [3, 2, 0]


def test_stratified_split_is_deterministic_disjoint_and_sorted() -> None:
    labels = torch.arange(1000) % 10
    state = torch.random.get_rng_state()
    train_idx, val_idx = data.stratified_split(labels, 100, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    again = data.stratified_split(labels, 100, seed=7)
    assert torch.equal(train_idx, again[0]) and torch.equal(val_idx, again[1])
    assert not torch.equal(val_idx, data.stratified_split(labels, 100, seed=8)[1])
    assert train_idx.dtype == val_idx.dtype == torch.int64
    assert torch.equal(train_idx, train_idx.sort().values) and torch.equal(val_idx, val_idx.sort().values)
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(1000))
    assert len(val_idx) == 100
    assert data.stratified_split(labels, 0, seed=0)[1].shape == (0,)


def test_make_splits_subset_then_validation(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root, download=False)
    splits = data.make_splits(cifar, DataConfig(train_subset=60, val_size=20, test_subset=10))
    assert len(splits.train_labels) == 40 and len(splits.val_labels) == 20
    assert splits.train_images.shape == (40, 3, 32, 32) and splits.val_images.dtype == torch.uint8
    # image k carries k in its first byte: the held-out images come from the first 60 only
    val_ids = splits.val_images[:, 0, 0, 0].long()
    train_ids = splits.train_images[:, 0, 0, 0].long()
    assert int(val_ids.max()) < 60 and int(train_ids.max()) < 60
    assert sorted(val_ids.tolist() + train_ids.tolist()) == list(range(60))
    assert torch.equal(splits.val_labels, train_label(val_ids))
    assert torch.bincount(splits.val_labels, minlength=10).tolist() == [2] * 10  # 6 per class in 60
    assert torch.equal(splits.test_images, cifar.test_images[:10])
    assert torch.equal(splits.test_labels, torch.arange(10))
    same = data.make_splits(cifar, DataConfig(train_subset=60, val_size=20, split_seed=0))
    assert torch.equal(same.val_images, splits.val_images)
    other = data.make_splits(cifar, DataConfig(train_subset=60, val_size=20, split_seed=1))
    assert not torch.equal(other.val_images, splits.val_images)


def test_make_splits_without_validation(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root, download=False)
    splits = data.make_splits(cifar, DataConfig(val_size=0))
    assert splits.val_images.shape == (0, 3, 32, 32) and splits.val_labels.shape == (0,)
    assert torch.equal(splits.train_images, cifar.train_images)
    assert len(splits.test_labels) == N_TEST


def test_make_splits_refuses_impossible_sizes(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root, download=False)
    with pytest.raises(ConfigError, match=r"data\.val_size \(100\) must be smaller than the 100 training"):
        data.make_splits(cifar, DataConfig(val_size=100))
    with pytest.raises(ConfigError, match=r"data\.val_size \(5000\).* 50 training images \(after data\."):
        data.make_splits(cifar, DataConfig.model_construct(train_subset=50, val_size=5000))
    with pytest.raises(ConfigError, match=r"data\.train_subset \(200\) is larger than the 100"):
        data.make_splits(cifar, DataConfig(train_subset=200, val_size=10))
    with pytest.raises(ConfigError, match=r"data\.test_subset \(51\)"):
        data.make_splits(cifar, DataConfig(val_size=10, test_subset=51))


def test_make_splits_of_test_only_data(fake_root: Path) -> None:
    cifar = data.load_cifar10(fake_root, download=False, split="test")
    splits = data.make_splits(cifar, DataConfig(test_subset=20))
    assert len(splits.train_labels) == len(splits.val_labels) == 0 and len(splits.test_labels) == 20


# --------------------------------------------------------------------------------------------
# Batch order


def test_epoch_permutation() -> None:
    perm = data.epoch_permutation(1000, seed=1, epoch=0)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(1000))
    assert torch.equal(perm, data.epoch_permutation(1000, seed=1, epoch=0))
    assert not torch.equal(perm, data.epoch_permutation(1000, seed=1, epoch=1))
    assert not torch.equal(perm, data.epoch_permutation(1000, seed=2, epoch=0))
    perm[:] = 0  # the caller owns its copy
    assert torch.equal(data.epoch_permutation(1000, 1, 0).sort().values, torch.arange(1000))


def test_steps_per_epoch_keeps_the_last_partial_batch() -> None:
    assert [data.steps_per_epoch(n, 32) for n in (0, 1, 32, 33, 96, 100)] == [0, 1, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        data.steps_per_epoch(10, 0)


def test_batch_indices_cover_the_epoch_and_shard_exactly() -> None:
    n, batch = 100, 32
    perm = data.epoch_permutation(n, seed=5, epoch=2)
    batches = [data.batch_indices(n, batch, 5, 2, step) for step in range(4)]
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(batches), perm)
    for step, global_batch in enumerate(batches):
        shards = [data.batch_indices(n, batch, 5, 2, step, rank, world_size=3) for rank in range(3)]
        assert torch.equal(torch.cat(shards), global_batch)
    assert [len(data.batch_indices(n, batch, 5, 2, 0, r, 3)) for r in range(3)] == [11, 11, 10]
    with pytest.raises(IndexError):
        data.batch_indices(n, batch, 5, 2, 4)
    with pytest.raises(ValueError):
        data.batch_indices(n, batch, 5, 2, 0, rank=3, world_size=3)


def test_step_generator_depends_on_every_argument() -> None:
    def draw(*args: int) -> torch.Tensor:
        return torch.rand(8, generator=data.step_generator(*args[:3], torch.device("cpu"), rank=args[3]))

    base = draw(1, 2, 3, 0)
    assert torch.equal(base, draw(1, 2, 3, 0))
    for other in [(0, 2, 3, 0), (1, 3, 3, 0), (1, 2, 4, 0), (1, 2, 3, 1), (1, 3, 2, 0)]:
        assert not torch.equal(base, draw(*other)), other
    assert data.step_generator(0, 0, 0, "cpu").device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Real CIFAR-10 (CERBERUS_DATA)


@pytest.mark.realdata
def test_real_cifar10(tmp_path: Path) -> None:
    root = os.environ.get("CERBERUS_DATA")
    if not root:
        pytest.skip("set CERBERUS_DATA to a folder holding cifar-10-batches-py/")
    cifar = data.load_cifar10(Path(root), download=False)
    assert cifar.train_images.shape == (50000, 3, 32, 32) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (10000, 3, 32, 32) and cifar.test_labels.dtype == torch.int64
    assert torch.bincount(cifar.train_labels).tolist() == [5000] * 10
    assert torch.bincount(cifar.test_labels).tolist() == [1000] * 10
    assert cifar.classes == data.CLASSES
    archive = Path(root) / "cifar-10-python.tar.gz"
    if archive.is_file():  # the prepare script's mirror: other MD5, so it must not be checked
        copy = data.load_cifar10(tmp_path / "cache", download=True, url=archive.as_uri())
        assert torch.equal(copy.train_images, cifar.train_images)
        assert torch.equal(copy.train_labels, cifar.train_labels)
        assert torch.equal(copy.test_images, cifar.test_images)
        assert torch.equal(copy.test_labels, cifar.test_labels)
