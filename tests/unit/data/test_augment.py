"""Batch augmentation: identity, exact flips, geometry of the affine composition, blur, elastic,
photometric range, seeding, config parsing (a pretrained backbone's normalisation is the model's
own: tests/unit/models/test_input_adapter.py)."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from cxrstudy.data.augment import BatchAugment, _gaussian_blur, from_config, none


@pytest.fixture
def images():
    return torch.rand((6, 1, 32, 32), generator=torch.Generator().manual_seed(0))


def _params(aug, n, **overrides):
    params = aug.sample_params(n)
    neutral = {"flip": torch.zeros(n, dtype=torch.bool), "angle_deg": torch.zeros(n),
               "translate": torch.zeros(n, 2), "scale": torch.ones(n),
               "crop_size": torch.ones(n, 2), "crop_center": torch.zeros(n, 2),
               "elastic": torch.zeros(n, dtype=torch.bool)}
    params.update(neutral)
    params.update(overrides)
    return params


def test_identity_configs_return_the_input_exactly(images):
    batch = {"image": images, "index": torch.arange(6)}
    for aug in (BatchAugment.none(), none(), from_config(None), from_config("none"),
                from_config({}), from_config({"hflip": 0, "rotate_deg": 0, "translate": 0,
                                              "scale": [1, 1], "crop_scale": [1, 1],
                                              "brightness": 0, "contrast": 0})):
        assert aug.is_identity
        assert torch.equal(aug(images), images)
        out = aug(batch)
        assert torch.equal(out["image"], images) and out["index"] is batch["index"]


def test_hflip_always_equals_torch_flip(images):
    aug = BatchAugment(**{**BatchAugment.none().config(), "hflip": 1.0})
    assert torch.equal(aug(images), torch.flip(images, dims=[-1]))


def test_hflip_half_flips_some_samples_exactly(images):
    aug = BatchAugment(**{**BatchAugment.none().config(), "hflip": 0.5, "seed": 11})
    out = aug(images)
    flipped = [torch.equal(o, torch.flip(x, dims=[-1])) for o, x in zip(out, images)]
    kept = [torch.equal(o, x) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_affine_path_flip_and_rotation_match_exact_ops(images):
    aug = BatchAugment(seed=0)
    flip = aug.warp(images, _params(aug, 6, flip=torch.ones(6, dtype=torch.bool)))
    assert torch.allclose(flip, torch.flip(images, dims=[-1]), atol=1e-6)
    rotated = aug.warp(images, _params(aug, 6, angle_deg=torch.full((6,), 90.0)))
    # positive angles turn the picture counter-clockwise, as torch.rot90 does
    assert torch.allclose(rotated, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-5)


def test_translation_moves_content_by_the_fraction_of_the_side(images):
    aug = BatchAugment(seed=0)
    shift = torch.tensor([[0.25, 0.0]]).repeat(6, 1)  # 8 of 32 px to the right
    out = aug.warp(images, _params(aug, 6, translate=shift))
    assert torch.allclose(out[..., 8:], images[..., :-8], atol=1e-5)
    assert torch.all(out[..., :8] == 0)  # zeros padding


def test_centre_crop_of_half_the_side_zooms_in(images):
    square = torch.zeros(2, 1, 32, 32)
    square[..., 8:24, 8:24] = 1.0
    aug = BatchAugment(seed=0)
    out = aug.warp(square, _params(aug, 2, crop_size=torch.full((2, 2), 0.5)))
    assert torch.all(out[..., 1:-1, 1:-1] == 1.0)


def test_full_augmentation_keeps_shape_dtype_and_range(images):
    aug = BatchAugment(blur_p=1.0, elastic_p=1.0, brightness=0.3, contrast=0.3, seed=5)
    out = aug(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(out, images, atol=1e-3)
    original = torch.rand((6, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, original)  # the input is left intact


def test_same_seed_same_output_and_state_resumes(images):
    a = BatchAugment(elastic_p=0.5, blur_p=0.5, seed=3)
    b = BatchAugment(elastic_p=0.5, blur_p=0.5, seed=3)
    assert torch.equal(a(images), b(images))
    assert not torch.equal(BatchAugment(seed=4)(images), BatchAugment(seed=3)(images))
    state = a.state_dict()
    next_a = a(images)
    b.load_state_dict(state)
    assert torch.equal(b(images), next_a)


def test_blur_uses_each_samples_sigma(images):
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8, 1.2])
    out = _gaussian_blur(images, sigma)
    radius = 6  # ceil(3 × max σ)
    for k in range(6):
        expected = TF.gaussian_blur(images[k], kernel_size=2 * radius + 1, sigma=float(sigma[k]))
        assert torch.allclose(out[k], expected, atol=1e-5)


def test_blur_only_touches_chosen_samples(images):
    aug = BatchAugment(**{**BatchAugment.none().config(), "blur_p": 0.5, "seed": 2})
    out = aug(images)
    same = [torch.equal(o, x) for o, x in zip(out, images)]
    assert any(same) and not all(same)


def test_elastic_field_peak_and_smoothness():
    aug = BatchAugment(elastic_p=1.0, elastic_alpha=0.05, elastic_sigma=0.1)
    field = aug._elastic_field(4, 64, 64, seed=0, device=torch.device("cpu"),
                               dtype=torch.float32)
    assert field.shape == (4, 64, 64, 2)
    peaks = field.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(peaks, torch.full((4,), 0.1), atol=1e-6)  # 2 × alpha, normalised units
    step = (field[:, 1:] - field[:, :-1]).abs().max()
    assert step < 0.1 * 0.2  # neighbouring pixels move almost together


def test_from_config_checks_keys_and_values():
    aug = from_config({"hflip": 0.2, "scale": [0.8, 1.2], "seed": 1})
    assert aug.hflip == 0.2 and aug.scale == (0.8, 1.2) and aug.rotate == (-10.0, 10.0)
    with pytest.raises(ValueError, match="rotation"):
        from_config({"rotation": 5})
    with pytest.raises(ValueError, match="hflip"):
        BatchAugment(hflip=1.5)
    with pytest.raises(TypeError, match="float tensor"):
        BatchAugment()(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_batch_device(images):
    aug = BatchAugment(blur_p=1.0, elastic_p=1.0, seed=0)
    out = aug(images.cuda())
    assert out.is_cuda and out.shape == images.shape
