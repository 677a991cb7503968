"""Layered scenes and domain folders (Sec. 7 data): ground truth, pairing, robust reading, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from branchspec import BranchspecError
from branchspec.data.domains import DomainImages, StepBatches, load_domains
from branchspec.data.scenes import LAYERS, evaluation_scenes, render_scenes, training_scenes


# --------------------------------------------------------------------------------------------- layered scenes
def test_layers_sum_exactly_to_the_image_within_range():
    s = render_scenes(np.arange(12), np.arange(12) % 3, size=32, num_domains=3)
    assert s.images.shape == (12, 3, 32, 32)
    assert set(s.layers) == {"base", *LAYERS}
    torch.testing.assert_close(sum(s.layers.values()), s.images, rtol=0, atol=0)
    assert s.images.abs().max() <= 1.05
    for name in LAYERS:  # every layer is present in every image
        assert (s.layers[name].flatten(1).abs().max(1).values > 1e-3).all(), name


def test_every_scene_renders_in_every_domain_and_only_the_texture_changes():
    per_domain = evaluation_scenes(5, size=32, num_domains=3)
    assert len(per_domain) == 3
    a, b = per_domain[0], per_domain[2]
    assert torch.equal(a.scene_ids, b.scene_ids)
    for name in ("base", "diffuse", "specular", "hue", "eyes"):
        torch.testing.assert_close(a.layers[name], b.layers[name])
    assert not torch.allclose(a.layers["texture"], b.layers["texture"])
    hue = a.layers["hue"]
    torch.testing.assert_close(hue.sum(1), torch.zeros_like(hue[:, 0]), atol=1e-6, rtol=0)  # chroma only


def test_a_scene_depends_on_its_id_and_seed_only():
    one = render_scenes([7], 1, size=32)
    many = render_scenes([3, 7, 9], 1, size=32)
    torch.testing.assert_close(one.images[0], many.images[1])
    other = render_scenes([7], 1, size=32, seed=1)
    assert not torch.allclose(one.images, other.images)


def test_training_scenes_are_unpaired():
    data = training_scenes(9, size=16, num_domains=3)
    assert data.classes == ["spots", "stripes", "rings"]
    assert data.counts() == {"spots": 3, "stripes": 3, "rings": 3}
    assert data.images.dtype == torch.uint8
    evaluation = evaluation_scenes(2, size=16, num_domains=3)
    assert evaluation[0].scene_ids.min() > 8  # held-out scenes are never training scenes


@pytest.mark.parametrize("kw", [dict(num_domains=1), dict(num_domains=4), dict(size=8)])
def test_bad_scene_options(kw):
    with pytest.raises(BranchspecError):
        render_scenes([0], 0, **{"size": 32, "num_domains": 2, **kw})


# ---------------------------------------------------------------------------------------------- domain folders
def write_images(folder, kinds):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, kind in enumerate(kinds):
        path = folder / f"{i}.png"
        if kind == "rgb":
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
        elif kind == "gray":
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(path)
        elif kind == "rgba":
            Image.fromarray(rng.integers(0, 255, (50, 64, 4), dtype=np.uint8), "RGBA").save(path)
        elif kind == "16bit":
            Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)).save(path)
        elif kind == "palette":
            Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).convert("P").save(path)
        elif kind == "corrupt":
            path.write_bytes(b"not an image at all")


def test_mixed_sizes_and_modes_are_read_as_rgb(tmp_path):
    write_images(tmp_path / "train" / "cat", ["rgb", "gray", "16bit", "corrupt"])
    write_images(tmp_path / "train" / "dog", ["rgba", "palette"])
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="unreadable"):
        data = load_domains(tmp_path, 16, show_progress=False)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (5, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.counts() == {"cat": 3, "dog": 2}
    assert data.skipped == {"cat": 1}
    assert data.images[1].float().std(0).max() == 0  # grayscale: R = G = B
    assert data.images[2].float().std() > 20  # 16-bit rescaled to 8 bits, not clipped to white
    with pytest.warns(UserWarning):
        picked = load_domains(tmp_path, 16, ["dog", "cat"], show_progress=False)
    assert picked.classes == ["dog", "cat"] and picked.counts() == {"dog": 2, "cat": 3}


def test_domain_errors(tmp_path):
    write_images(tmp_path / "train" / "a", ["rgb"])
    with pytest.raises(BranchspecError, match="at least 2"):
        load_domains(tmp_path, 16, show_progress=False)
    write_images(tmp_path / "train" / "b", ["corrupt"])
    with pytest.raises(BranchspecError, match="no readable image"), pytest.warns(UserWarning):
        load_domains(tmp_path, 16, show_progress=False)
    write_images(tmp_path / "train" / "b", ["gray"])
    with pytest.raises(BranchspecError, match="not found"):
        load_domains(tmp_path, 16, ["a", "zebra"], show_progress=False)
    with pytest.raises(BranchspecError, match="at least 2"):
        load_domains(tmp_path, 16, ["a"], show_progress=False)
    with pytest.raises(BranchspecError, match="does not exist"):
        load_domains(tmp_path / "nowhere", 16, show_progress=False)
    with pytest.raises(BranchspecError, match="16..256"):
        load_domains(tmp_path, 512, show_progress=False)


def test_a_domain_subset_is_relabelled_and_resized():
    from branchspec.data import images as image_sets

    tree = image_sets.ImageSet(torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous(),
                               torch.tensor([0, 1, 2, 1]), ["plane", "cat", "dog"])
    import unittest.mock as mock

    with mock.patch("branchspec.data.domains.load_images", return_value=tree):
        data = load_domains("cifar", 16, ["dog", "cat"], show_progress=False)
    assert data.classes == ["dog", "cat"] and data.labels.tolist() == [1, 0, 1]
    assert data.images.shape == (3, 3, 16, 16) and data.images[:, 0, 0, 0].tolist() == [1, 2, 3]


def test_step_batches_are_a_function_of_the_step_and_balanced():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 4, 4).contiguous()
    domains = torch.tensor([0] * 18 + [1] * 2)
    data = DomainImages(images, domains, ["many", "few"])
    batches = StepBatches(data, 64, seed=3)
    x1, y1, t1 = batches[5]
    x2, y2, t2 = batches[5]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(t1, t2)
    assert not torch.equal(batches[6][0], x1)
    assert not torch.equal(StepBatches(data, 64, seed=3, rank=1)[5][0], x1)
    index = ((x1[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert torch.equal(domains[index], y1)  # each image carries its own domain
    assert 0.3 < y1.float().mean() < 0.7  # domains drawn uniformly, not by their image counts
    assert x1.min() >= -1 and x1.max() <= 1
