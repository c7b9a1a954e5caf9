"""The occlusion augmentation (training/augment.py): the same occluder in the driving and the supervision
frames at the same place over the face, the mask unchanged, deterministic, at the configured rate, moving,
and never in validation."""
from __future__ import annotations

import pytest
import torch

from dreamidv_core.errors import InputError
from tests.synthetic_data import synthetic_items, write_synthetic_dataset
from training.augment import SHAPES, OcclusionAugmentation, face_box, render_occluder
from training.dataset import DreamIDVDataset
from training.validation import validation_items


def clone(item):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in item.items()}


@pytest.fixture(scope="module")
def item():
    return synthetic_items(1, frames=9, size=(48, 64), seed=4)[0]


def test_the_same_occluder_in_driving_and_target_over_the_face(item):
    aug = OcclusionAugmentation(1.0)
    out = aug(clone(item), 11)
    alpha = out["occluder"]  # [F, H, W]
    assert alpha.shape == (9, 48, 64) and alpha.max() == 1.0
    covered = alpha > 0.99
    face = item["mask"][0] > 0.5
    assert (covered & face).any(dim=(1, 2)).all()  # it overlaps the face in every frame
    # fully covered pixels: driving and target show the same occluder pixels; elsewhere nothing changed
    assert torch.allclose(out["video"][:, covered], out["target"][:, covered])
    assert not torch.allclose(item["video"][:, covered], item["target"][:, covered])  # the faces differ there
    untouched = alpha == 0
    assert torch.equal(out["video"][:, untouched], item["video"][:, untouched])
    assert torch.equal(out["target"][:, untouched], item["target"][:, untouched])
    assert torch.equal(out["mask"], item["mask"])  # the face mask is not changed
    assert out["video"].min() >= -1 and out["video"].max() <= 1
    # it moves: the coverage of the first and the last frame differ
    assert not torch.equal(covered[0], covered[-1])


def test_deterministic_and_at_the_configured_rate():
    aug = OcclusionAugmentation(0.3, seed=5)
    draws = [aug.draw(epoch, index) for epoch in range(10) for index in range(40)]
    assert draws == [OcclusionAugmentation(0.3, seed=5).draw(e, i) for e in range(10) for i in range(40)]
    rate = sum(d is not None for d in draws) / len(draws)
    assert 0.24 < rate < 0.36
    assert all(OcclusionAugmentation(0.0).draw(e, 0) is None for e in range(50))
    assert sum(OcclusionAugmentation(1.0).draw(e, 0) is not None for e in range(50)) == 50
    with pytest.raises(InputError, match="probability"):
        OcclusionAugmentation(1.5)


def test_every_shape_kind_renders(monkeypatch):
    import training.augment as A

    box = (32.0, 24.0, 20.0, 24.0)
    for kind in SHAPES:
        monkeypatch.setattr(A, "SHAPES", (kind,))
        rgb, alpha = render_occluder(3, 48, 64, box, seed=3)
        assert 20 < int((alpha > 0.5).sum()) < 3 * 48 * 64, kind
        assert rgb.min() >= 0 and rgb.max() <= 1


def test_empty_mask_leaves_the_item(item):
    it = clone(item)
    it["mask"].zero_()
    assert face_box(it["mask"]) is None
    out = OcclusionAugmentation(1.0)(it, 1)
    assert "occluder" not in out and torch.equal(out["video"], item["video"])


def test_dataset_occludes_and_validation_does_not(tmp_path):
    write_synthetic_dataset(tmp_path, 2, frames=5, size=(32, 48), seed=2)
    plain = DreamIDVDataset(tmp_path, 48, 32, 5)
    occluded = DreamIDVDataset(tmp_path, 48, 32, 5, occlusion=OcclusionAugmentation(1.0))
    a, b = plain[(0, 3)], occluded[(0, 3)]
    assert "occluder" in b and not torch.equal(a["video"], b["video"]) and torch.equal(a["mask"], b["mask"])
    assert torch.equal(occluded[(0, 3)]["video"], b["video"])  # same key, same occluder (any worker)
    assert not torch.equal(occluded[(0, 4)]["video"], b["video"])  # another epoch, another occluder
    for val in validation_items(occluded, 2):  # validation reads the samples without augmentation
        assert "occluder" not in val
        assert torch.equal(val["video"], plain[val["index"]]["video"])
    assert occluded.occlusion is not None  # and the training dataset keeps it
