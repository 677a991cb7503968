"""Reading labelled images: image trees, tar archives (safely), CIFAR pickles, digits, and bad input."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from branchspec.data.images import load_images, read_image
from branchspec.errors import BranchspecError


def make_tree(root, splits=("train", "test"), classes=("cat", "dog"), n=3, size=8):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_tree_with_odd_images_is_read_and_corrupt_files_counted(tmp_path):
    root = make_tree(tmp_path / "tree")
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(root / "train/cat/gray.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(root / "train/cat/rgba.png")  # transparent
    Image.fromarray(np.full((16, 8), 65535, np.uint16)).save(root / "train/dog/deep.png")  # 16-bit, not square
    (root / "train/dog/broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 unreadable"):
        data = load_images(root, "train", size=8, show_progress=False)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (9, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.counts() == {"cat": 5, "dog": 4} and data.skipped == {"dog": 1}
    assert (data.images[data.labels == 0][-2:] >= 200).all()  # gray -> 200 in every channel, transparent -> white
    assert read_image(root / "train/dog/deep.png", 4).shape == (4, 4, 3)
    assert load_images(root, "train", size=8, limit_per_class=2, show_progress=False).counts() == {"cat": 2, "dog": 2}


def test_wrong_layouts_get_clear_errors(tmp_path):
    with pytest.raises(BranchspecError, match="does not exist"):
        load_images(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(BranchspecError, match="holds no class folders"):
        load_images(flat, show_progress=False)
    root = make_tree(tmp_path / "t", classes=("cat", "dog"))
    (root / "test" / "dog").rename(root / "test" / "bird")
    with pytest.raises(BranchspecError, match="same class folders"):
        load_images(root, "test", show_progress=False)
    empty = make_tree(tmp_path / "e")
    for p in (empty / "train" / "dog").iterdir():
        p.unlink()
    with pytest.raises(BranchspecError, match=r"\['dog'\] hold no readable image"):
        load_images(empty, show_progress=False)


def test_tar_archive_equals_tree_and_refuses_path_traversal(tmp_path):
    root = make_tree(tmp_path / "tree")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar")
    tree, packed = (load_images(src, "test", size=8, show_progress=False) for src in (root, archive))
    assert torch.equal(tree.images, packed.images) and torch.equal(tree.labels, packed.labels)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(root, arcname="cifar")
        info = tarfile.TarInfo("../../escape/train/cat/x.png")
        data = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data, "PNG")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
    with pytest.raises(BranchspecError, match="unsafe member"):
        load_images(evil, show_progress=False)
    assert not (tmp_path.parent / "escape").exists()
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:200])
    with pytest.raises(BranchspecError, match="cannot read the archive"):
        load_images(tmp_path / "cut.tar.gz", show_progress=False)


def test_cifar_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [i % 10, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    labels = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": labels}))
    with pytest.raises(BranchspecError, match="no readable image"):  # only 5 of 10 classes present
        load_images(tmp_path, "train")
    for i, name in enumerate(names):
        batch = {b"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_images(tmp_path, "train")  # the parent folder works too
    assert data.images.shape == (50, 3, 32, 32) and data.classes[3] == "c3"
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(data.images[0], torch.from_numpy(raw.reshape(3, 32, 32)))
    (folder / "test_batch").unlink()
    with pytest.raises(BranchspecError, match="test_batch"):
        load_images(folder, "test")


def test_digits_are_embedded_and_split():
    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (3, 8, 8)
    assert len(test) == 360 and train.classes == [str(c) for c in range(10)]
    assert int(train.images.max()) == 255


@pytest.mark.parametrize("layout", ["imagefolder", "train-only", "imagefolder-tar"])
def test_a_tree_without_a_test_split_holds_out_a_seeded_share(tmp_path, layout):
    """torchvision's ImageFolder (ROOT/<class>/*) and a train-only tree: 10% of each class becomes the test split,
    the same files at every call, never in both splits; another seed holds out other files."""
    tree = make_tree(tmp_path / "t", splits=("train",), n=20)
    source = tree / "train" if layout.startswith("imagefolder") else tree
    if layout == "imagefolder-tar":
        source = tmp_path / "flat.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tree / "train", arcname="pets")  # pets/<class>/<file>: no split folders
    train = load_images(source, "train", size=8, show_progress=False)
    test = load_images(source, "test", size=8, show_progress=False)
    assert train.counts() == {"cat": 18, "dog": 18} and test.counts() == {"cat": 2, "dog": 2}
    assert "10% of each class held out as the test split (seed 0)" in test.origin
    everything = torch.cat([train.images, test.images]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == 40  # no image in both splits
    again = load_images(source, "test", size=8, show_progress=False)
    assert torch.equal(again.images, test.images)
    other = load_images(source, "test", size=8, seed=1, show_progress=False)
    assert not torch.equal(other.images, test.images)
    assert load_images(source, "test", size=8, holdout=0.25, show_progress=False).counts() == {"cat": 5, "dog": 5}
    with pytest.raises(BranchspecError, match="holdout must lie between 0 and 1"):
        load_images(source, "test", holdout=1.0, show_progress=False)


def test_a_tree_with_a_test_split_says_so(tmp_path):
    root = make_tree(tmp_path / "tree")
    assert load_images(root, "test", size=8, show_progress=False).origin == f"{root}/test"
