"""Every op against a plain reference: scipy/numpy resampling, per-sample loops, the AlexNet formula."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from traincraft.augment._sample import apply_selected
from traincraft.augment.color import ColorJitter
from traincraft.augment.compose import Compose
from traincraft.augment.crop import RandomCrop, gather_crops
from traincraft.augment.fancy_pca import FancyPCALighting
from traincraft.augment.flip import RandomHorizontalFlip
from traincraft.augment.geometry import RandomGeometry
from traincraft.augment.noise import GaussianNoise
from traincraft.augment.scale_jitter import ScaleJitterCrop, resize_boxes


def _reference_warp(image: np.ndarray, p: dict, k: float) -> np.ndarray:
    """Output pixel → input pixel by the forward map written out in pixels, bilinear with zero padding (scipy)."""
    channels, height, width = image.shape
    sh = math.tan(p["shear"])
    forward = np.array([[math.cos(p["angle"]), -math.sin(p["angle"])], [math.sin(p["angle"]), math.cos(p["angle"])]])
    forward = forward @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([p["sx"], p["sy"]])
    inverse = np.linalg.inv(forward)
    v, u = np.meshgrid(np.arange(height) + 0.5 - height / 2, np.arange(width) + 0.5 - width / 2, indexing="ij")
    # lens distortion acts on normalized output coordinates, before the affine map
    nu, nv = u / (width / 2), v / (height / 2)
    factor = 1.0 + k * (nu**2 + nv**2)
    u, v = u * factor - p["tx"] * width, v * factor - p["ty"] * height
    src = inverse @ np.stack([u.ravel(), v.ravel()])
    cols, rows = src[0] + width / 2 - 0.5, src[1] + height / 2 - 0.5
    return np.stack([map_coordinates(image[c], [rows, cols], order=1, mode="grid-constant", cval=0.0)
                     .reshape(height, width) for c in range(channels)])


@pytest.mark.parametrize("shape", [(2, 3, 12, 12), (2, 1, 10, 16)])
def test_geometry_equals_the_pixel_space_reference(shape):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    op = RandomGeometry(degrees=30, translate=0.15, scale=(0.8, 1.2), stretch=(0.9, 1.1), shear=10, distortion=0.2)
    params = op.sample_parameters(shape[0])
    out = op.apply(x, params)
    for i in range(shape[0]):
        p = {key: float(value[i]) for key, value in params.items()}
        np.testing.assert_allclose(out[i].numpy(), _reference_warp(x[i].numpy(), p, p["k"]), atol=1e-6)


def test_geometry_draws_within_ranges_and_identity_at_defaults():
    op = RandomGeometry(degrees=20, translate=0.1, scale=(0.5, 2.0), shear=5)
    params = op.sample_parameters(2000)
    assert params["angle"].abs().max() <= math.radians(20) and params["angle"].abs().max() > math.radians(19)
    assert params["tx"].abs().max() <= 0.1 and params["sx"].min() >= 0.5 and params["sx"].max() <= 2.0
    assert torch.equal(params["sx"], params["sy"])  # no stretch: isotropic
    x = torch.rand(3, 3, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(RandomGeometry()(x), x)  # every component off: the identity


def test_crops_are_windows_of_the_padded_images():
    torch.manual_seed(1)
    x = torch.rand(6, 2, 9, 11)
    out = RandomCrop((5, 7), padding=2)(x)
    padded = torch.nn.functional.pad(x, [2] * 4)
    for i in range(6):  # brute force: some offset of the padded image matches exactly
        assert any(torch.equal(out[i], padded[i, :, t : t + 5, s : s + 7]) for t in range(9) for s in range(9))
    top, left = torch.tensor([0, 3]), torch.tensor([4, 1])
    loop = torch.stack([x[i, :, top[i] : top[i] + 4, left[i] : left[i] + 5] for i in range(2)])
    assert torch.equal(gather_crops(x[:2], top, left, 4, 5), loop)
    with pytest.raises(ValueError, match="does not fit images of 9x11"):
        RandomCrop(12)(x)


def test_flip_touches_only_the_selected_samples_and_about_p_of_them():
    torch.manual_seed(2)
    x = torch.rand(400, 1, 3, 5)
    out = RandomHorizontalFlip(p=0.3)(x)
    flipped = torch.tensor([torch.equal(o, f) for o, f in zip(out, x.flip(-1), strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped ^ same).all())
    assert abs(flipped.float().mean().item() - 0.3) < 0.07


def test_p_below_one_computes_only_the_selected_samples():
    seen = []

    def op(v):
        seen.append(v.shape[0])
        return v + 1

    torch.manual_seed(3)
    x = torch.zeros(1000, 1, 1, 1)
    out = apply_selected(x, 0.25, op)
    assert seen[0] == int((out != 0).sum()) and 180 < seen[0] < 320  # the op saw only what it changed
    assert apply_selected(x, 0.0, op) is x and len(seen) == 1


def _sequential_colour(x: np.ndarray, f: dict) -> np.ndarray:
    """Brightness, saturation (towards luma grey), hue (YIQ rotation), contrast (towards mean grey), one at a time."""
    luma = np.array([0.299, 0.587, 0.114])
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    x = x * f["brightness"]
    grey = np.tensordot(luma, x, axes=1)
    x = f["saturation"] * x + (1 - f["saturation"]) * grey[None]
    a = 2 * math.pi * f["hue"]
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    x = np.tensordot(np.linalg.inv(yiq) @ rot @ yiq, x, axes=1)
    mean_grey = np.tensordot(luma, x, axes=1).mean()
    x = f["contrast"] * x + (1 - f["contrast"]) * mean_grey
    return np.clip(x, 0, 1)


def test_colour_jitter_equals_the_sequential_reference():
    torch.manual_seed(4)
    x = torch.rand(5, 3, 6, 6, dtype=torch.float64)
    op = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    factors = op.sample_factors(5)
    out = op.apply(x, factors)
    for i in range(5):
        f = {k: float(v[i]) for k, v in factors.items()}
        np.testing.assert_allclose(out[i].numpy(), _sequential_colour(x[i].numpy(), f), atol=1e-5)
    grey = torch.rand(4, 1, 5, 5)
    assert ColorJitter(contrast=0.3)(grey).shape == grey.shape  # simple contrast jitter works on grayscale
    with pytest.raises(ValueError, match="needs 3-channel images; got 1"):
        ColorJitter(saturation=0.3)(grey)


def test_fancy_pca_offsets_follow_the_alexnet_formula():
    torch.manual_seed(5)
    vectors = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].float()
    values = torch.tensor([0.04, 0.01, 0.002])
    op = FancyPCALighting(sigma=0.1, eigenvalues=values.tolist(), eigenvectors=vectors.tolist())
    x = torch.full((4000, 3, 2, 2), 0.5)
    change = op(x) - x
    offsets = change[:, :, 0, 0]
    assert torch.equal(change, offsets[:, :, None, None].expand_as(change))  # one colour offset per sample
    alpha = (offsets @ vectors) / values  # project back onto the components: α ~ N(0, 0.1²)
    assert alpha.mean(0).abs().max() < 0.01 and (alpha.std(0) - 0.1).abs().max() < 0.01
    with pytest.raises(RuntimeError, match="no principal components"):
        FancyPCALighting()(x)
    with pytest.raises(ValueError, match="needs 3-channel images"):
        op(torch.rand(2, 1, 4, 4))


def test_noise_has_the_requested_spread_and_keeps_the_range():
    torch.manual_seed(6)
    x = torch.full((64, 1, 16, 16), 0.5)
    out = GaussianNoise(std=0.05)(x)
    assert abs((out - x).std().item() - 0.05) < 0.002 and out.min() >= 0 and out.max() <= 1


def test_resize_boxes_equals_interpolate_of_the_cropped_box():
    torch.manual_seed(7)
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    boxes = torch.tensor([[2.0, 3.0, 8.0, 8.0], [0.0, 0.0, 20.0, 24.0]], dtype=torch.float64)
    out = resize_boxes(x, boxes, 16, 16)
    first = torch.nn.functional.interpolate(x[:1, :, 2:10, 3:11], size=16, mode="bilinear", align_corners=False)
    whole = torch.nn.functional.interpolate(x[1:], size=16, mode="bilinear", align_corners=False)
    # inside the box both read the same pixels; at its edge interpolate clamps to the box, we read the neighbours
    torch.testing.assert_close(out[:1, :, 1:-1, 1:-1], first[:, :, 1:-1, 1:-1])
    torch.testing.assert_close(out[1:], whole)
    mirrored = resize_boxes(x, boxes, 16, 16, flip=torch.tensor([True, False]))
    torch.testing.assert_close(mirrored[0], out[0].flip(-1))
    torch.testing.assert_close(mirrored[1], out[1])


def _grid_sample_reference(x, boxes, out_h, out_w, flip):
    """The resize as one 2-D grid_sample on a grid built directly from the boxes (the accelerator path's maths)."""
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    left = torch.where(flip[:, None], left + width, left)
    width = torch.where(flip[:, None], -width, width)
    ys = top + (torch.arange(out_h, dtype=x.dtype) + 0.5) / out_h * height  # source pixel edges, not centres
    xs = left + (torch.arange(out_w, dtype=x.dtype) + 0.5) / out_w * width
    grid = torch.stack(
        torch.broadcast_tensors(xs[:, None, :] * 2 / x.shape[3] - 1, ys[:, :, None] * 2 / x.shape[2] - 1), dim=-1
    )
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize(
    ("shape", "out_hw", "dtype", "block_bytes"),
    [
        ((13, 3, 40, 36), (24, 28), torch.float64, 1),  # upscale and downscale, one sample per block
        ((13, 3, 40, 36), (24, 28), torch.float32, 20_000),  # blocks of several samples, a ragged last block
        ((5, 1, 1, 9), (3, 4), torch.float64, 4 << 20),  # one-row images
        ((4, 2, 17, 11), (30, 2), torch.float64, 4 << 20),  # tall output, two columns
    ],
)
def test_cpu_separable_resize_equals_one_grid_sample(monkeypatch, shape, out_hw, dtype, block_bytes):
    from traincraft.augment import scale_jitter

    monkeypatch.setattr(scale_jitter, "_CPU_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(11)
    n, _, height, width = shape
    x = torch.rand(shape, dtype=dtype, generator=gen)
    # boxes partly outside the image (border padding), fractional, some larger than the image
    size = torch.rand(n, 2, dtype=dtype, generator=gen) * 1.4 * torch.tensor([height, width], dtype=dtype) + 0.5
    corner = (torch.rand(n, 2, dtype=dtype, generator=gen) - 0.2) * torch.tensor([height, width], dtype=dtype)
    boxes = torch.cat([corner[:, :1], corner[:, 1:], size[:, :1], size[:, 1:]], dim=1)
    flip = torch.rand(n, generator=gen) < 0.5
    expected = _grid_sample_reference(x, boxes, *out_hw, flip)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 0}
    torch.testing.assert_close(scale_jitter.resize_boxes(x, boxes, *out_hw, flip=flip), expected, **tol)
    # any memory layout gives the same result
    as_channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scale_jitter.resize_boxes(as_channels_last, boxes, *out_hw, flip=flip), expected, **tol)


def test_resize_boxes_of_an_empty_batch_is_empty():
    empty = resize_boxes(torch.rand(0, 3, 12, 10), torch.zeros(0, 4), 7, 9, torch.zeros(0, dtype=torch.bool))
    assert empty.shape == (0, 3, 7, 9)


def test_resize_boxes_keeps_gradients_through_the_grid_sample_path():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.0, 1.0, 5.0, 6.0], [0.0, 0.5, 8.0, 7.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda img: resize_boxes(img, boxes, 4, 5), (x,))
    with torch.no_grad():  # no gradient wanted: the CPU fast path, same values
        fast = resize_boxes(x, boxes, 4, 5)
    torch.testing.assert_close(fast, resize_boxes(x, boxes, 4, 5).detach())


def test_resize_boxes_adds_the_offset_on_every_path():
    x = torch.rand(3, 3, 12, 10, dtype=torch.float64)
    boxes = torch.tensor([[1.0, 2.0, 6.0, 5.0], [0.0, 0.0, 12.0, 10.0], [3.0, 1.0, 7.5, 8.0]], dtype=torch.float64)
    flip = torch.tensor([True, False, True])
    offset = torch.randn(3, 3, dtype=torch.float64)
    expected = _grid_sample_reference(x, boxes, 7, 9, flip) + offset[:, :, None, None]
    torch.testing.assert_close(resize_boxes(x, boxes, 7, 9, flip, offset), expected)  # CPU, separable
    grad_path = resize_boxes(x.clone().requires_grad_(), boxes, 7, 9, flip, offset)  # one grid_sample
    torch.testing.assert_close(grad_path.detach(), expected)


def _alexnet_like(p_light: float = 1.0):
    light = FancyPCALighting(sigma=0.3, eigenvalues=[0.2, 0.05, 0.01], eigenvectors=torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))[0].tolist(), p=p_light)
    return ScaleJitterCrop(min_size=24, max_size=40, size=20, flip=0.5), light


@pytest.mark.parametrize("p_light", [1.0, 0.5])
def test_compose_fuses_resample_and_lighting_with_the_same_draws_and_result(monkeypatch, p_light):
    crop, light = _alexnet_like(p_light)
    x = torch.rand(9, 3, 30, 26)
    torch.manual_seed(5)
    expected = light(crop(x))  # one op after the other
    fused_calls = []
    original = ScaleJitterCrop.forward_with_offsets

    def spy(self, images, offsets):
        fused_calls.append(offsets is not None)
        return original(self, images, offsets)

    monkeypatch.setattr(ScaleJitterCrop, "forward_with_offsets", spy)
    torch.manual_seed(5)
    out = Compose([crop, light])(x)
    assert torch.equal(out, expected)
    assert fused_calls == [p_light == 1.0]  # p < 1 selects samples: not fused, still the same result
    after = torch.rand(1)
    torch.manual_seed(5)
    light(crop(x))
    assert torch.equal(after, torch.rand(1))  # the random stream is left where the unfused ops leave it


def test_compose_does_not_fuse_modules_with_hooks_or_bad_input():
    crop, light = _alexnet_like()
    seen = []
    light.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    Compose([crop, light])(torch.rand(2, 3, 30, 26))
    assert seen == [torch.Size([2, 3, 20, 20])]  # the hook ran: the lighting ran as its own op
    with pytest.raises(ValueError, match="FancyPCALighting needs 3-channel images"):
        Compose(list(_alexnet_like()))(torch.rand(2, 1, 30, 26))


def test_scale_jitter_draws_short_sides_in_range_and_boxes_inside():
    op = ScaleJitterCrop(min_size=256, max_size=480, size=224)
    boxes = op.sample_boxes(5000, 300, 400)
    short_side = 224 * 300 / boxes[:, 2]  # the L each box corresponds to
    assert short_side.min() >= 256 - 1e-3 and short_side.max() <= 480 + 1e-3
    assert abs(short_side.mean().item() - 368) < 4  # uniform on [256, 480]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 300 + 1e-4).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 400 + 1e-4).all()
    with pytest.raises(ValueError, match="size <= min_size"):
        ScaleJitterCrop(min_size=200, size=224)


def test_compose_never_modifies_its_input():
    x = torch.rand(4, 3, 8, 8)
    before = x.clone()
    light = FancyPCALighting(eigenvalues=[0.1, 0.01, 0.001], eigenvectors=torch.eye(3).tolist())
    out = Compose([light, GaussianNoise(0.1), light])(x)
    assert torch.equal(x, before) and not torch.equal(out, x)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RandomGeometry(degrees=-1), "degrees must be >= 0"),
        (lambda: RandomGeometry(scale=(2.0, 1.0)), r"scale must be a \(min, max\) pair"),
        (lambda: RandomHorizontalFlip(p=1.5), r"p must lie in \[0, 1\]"),
        (lambda: ColorJitter(hue=0.7), "hue must lie in"),
        (lambda: RandomCrop(0), "size must be a positive"),
        (lambda: FancyPCALighting(eigenvalues=[1.0, 1.0, 1.0]), "give both eigenvalues and eigenvectors"),
    ],
)
def test_bad_configuration_is_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_tensors_are_rejected():
    with pytest.raises(ValueError, match="expects float images of shape"):
        RandomHorizontalFlip()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expects float images of shape"):
        RandomGeometry()(torch.rand(3, 4, 4))
