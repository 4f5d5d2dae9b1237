"""Any-res preprocessing against hand-computed resolutions and crops, and variance
selection (highest std first, ties, k >= number of crops)."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastencdec.vision.anyres import (
    CLIP_MEAN,
    CLIP_STD,
    AnyResConfig,
    normalize,
    process_image,
    resize_and_pad,
    select_best_resolution,
    split_crops,
    stack_images,
)
from fastencdec.vision.image_io import ImageError
from fastencdec.vision.selection import crop_std, select_top_k

PINPOINTS = ((336, 336), (672, 672), (1008, 672), (672, 1008))


def test_default_pinpoints_are_the_reference_grid():
    assert AnyResConfig().pinpoints == PINPOINTS
    assert AnyResConfig().crops_limit == 7  # base + 3x2 grid
    assert AnyResConfig(variance_k=2).crops_limit == 3


@pytest.mark.parametrize("size, expected", [
    # 800x600: (1008, 672) scales by 1.12 to 896x672, more than all 480000 pixels kept
    ((800, 600), (1008, 672)),
    # 100x100: every pinpoint keeps all 10000 pixels; (336, 336) wastes the least
    ((100, 100), (336, 336)),
    # 500x1000: (672, 1008) scales by 1.008 to 504x1008 (all 500000 kept)
    ((500, 1000), (672, 1008)),
    # 700x700: (672, 672) keeps 672*672 = 451584, (1008, 672) also 672x672 but wastes more
    ((700, 700), (672, 672)),
    # 2000x300: (1008, 672) scales by 0.504 to 1008x151 = 152208 (the most kept)
    ((2000, 300), (1008, 672)),
])
def test_select_best_resolution(size, expected):
    assert select_best_resolution(*size, PINPOINTS) == expected


def test_resize_and_pad_centres_and_keeps_aspect():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    out = np.asarray(resize_and_pad(img, 8, 8))  # scale 2: 8x4, pasted at y = 2
    assert out.shape == (8, 8, 3)
    assert (out[2:6] == (10, 20, 30)).all()
    assert (out[:2] == 0).all() and (out[6:] == 0).all()
    tall = np.asarray(resize_and_pad(Image.new("RGB", (1, 9), (5, 5, 5)), 6, 6))
    # scale_h = 6/9 < scale_w = 6: height 6, width ceil(1 * 6/9) = 1, pasted at x = 2
    assert (tall[:, 2] == 5).all() and (tall[:, :2] == 0).all() and (tall[:, 3:] == 0).all()


def test_split_crops_row_major(seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    crops = split_crops(arr, 3)
    assert crops.shape == (6, 3, 3, 3)
    expected = [arr[r:r + 3, c:c + 3] for r in (0, 3) for c in (0, 3, 6)]
    for got, want in zip(crops, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="does not split"):
        split_crops(arr, 4)


def test_normalize_hand_computed():
    px = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    px[0, 0, 1] = (255, 0, 51)
    out = normalize(px)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1],
                (0.2 - CLIP_MEAN[2]) / CLIP_STD[2]]
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(-CLIP_MEAN[0] / CLIP_STD[0]))


def _blocks_image(colours, cols, rows, crop):
    """An image made of crop-sized constant blocks, row by row."""
    arr = np.zeros((rows * crop, cols * crop, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        arr[r * crop:(r + 1) * crop, c * crop:(c + 1) * crop] = colour
    return arr


def test_process_image_crops_and_base(tmp_path, seed):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (6, 3))
    arr = _blocks_image(colours, cols=3, rows=2, crop=4)  # 12 x 8: fits (12, 8) exactly
    path = tmp_path / "blocks.png"
    Image.fromarray(arr).save(path)
    cfg = AnyResConfig(crop_size=4)
    out = process_image(path, cfg)
    assert out.grid == (3, 2) and out.n_crops == 7
    for i, colour in enumerate(colours):
        assert (out.crops[1 + i] == colour).all()
    base = np.asarray(Image.fromarray(arr).resize((4, 4), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out.crops[0], base)
    np.testing.assert_array_equal(out.stds, np.zeros(6))  # constant crops
    pixels = out.pixels(cfg)
    assert pixels.shape == (7, 3, 4, 4)
    torch.testing.assert_close(pixels, normalize(out.crops))


def test_process_image_pads_with_black():
    # 8x4 image of one colour into crop 4: best pinpoint (8, 8) keeps all 32 pixels with
    # the least waste; it is pasted at rows 2..5 of an 8x8 canvas
    img = Image.new("RGB", (8, 4), (200, 200, 200))
    out = process_image(img, AnyResConfig(crop_size=4))
    assert out.grid == (2, 2)
    top_left = out.crops[1]
    assert (top_left[:2] == 0).all() and (top_left[2:] == 200).all()
    assert (out.crops[0] == 200).all()  # the base crop is the whole image resized


def test_one_pixel_image_gives_constant_crops():
    out = process_image(Image.new("RGB", (1, 1), (9, 99, 199)), AnyResConfig(crop_size=4))
    assert out.grid == (1, 1) and out.n_crops == 2
    assert (out.crops == np.array([9, 99, 199], dtype=np.uint8)).all()


def test_crop_std_hand_computed():
    crops = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    crops[1, 0] = 255                 # half white, half black: gray std 127.5
    crops[2, 0, 0] = (255, 0, 0)      # one red pixel: gray values 76.245, 0, 0, 0
    stds = crop_std(crops)
    r = 0.299 * 255
    np.testing.assert_allclose(stds, [0.0, 127.5, np.std([r, 0, 0, 0])], rtol=1e-12)
    flat = np.full((1, 5, 5, 3), (235, 235, 228), dtype=np.uint8)
    assert crop_std(flat)[0] == 0.0  # exactly: flat crops tie at zero, never at 1e-14 noise


def test_select_top_k_ties_and_large_k(seed):
    scores = np.array([3.0, 7.0, 7.0, 1.0, 7.0, 0.0])
    assert select_top_k(scores, 2).tolist() == [1, 2]        # ties: the earlier crops
    assert select_top_k(scores, 3).tolist() == [1, 2, 4]
    assert select_top_k(scores, 4).tolist() == [0, 1, 2, 4]  # spatial order kept
    assert select_top_k(scores, 0).tolist() == []
    assert select_top_k(scores, 6).tolist() == list(range(6))
    assert select_top_k(scores, 100).tolist() == list(range(6))
    rng = np.random.default_rng(seed)
    random_scores = rng.random(20)
    k = int(rng.integers(1, 20))
    kept = select_top_k(random_scores, k)
    assert len(kept) == k and np.all(np.diff(kept) > 0)
    assert random_scores[kept].min() >= np.delete(random_scores, kept).max()
    with pytest.raises(ValueError, match="k must be"):
        select_top_k(scores, -1)


def test_variance_selection_keeps_busy_crops(seed):
    rng = np.random.default_rng(seed)
    crop = 4
    arr = _blocks_image([(50, 50, 50)] * 6, cols=3, rows=2, crop=crop)
    busy = [0, 2, 5]
    for b, amplitude in zip(busy, (40, 120, 80), strict=True):
        r, c = divmod(b, 3)
        block = rng.integers(0, amplitude, (crop, crop, 3))
        arr[r * crop:(r + 1) * crop, c * crop:(c + 1) * crop] = 50 + block
    img = Image.fromarray(arr)
    full = process_image(img, AnyResConfig(crop_size=crop))
    expected_std = crop_std(split_crops(arr, crop))
    np.testing.assert_allclose(full.stds, expected_std)
    for k in (1, 2, 3, 4, 6, 10):
        out = process_image(img, AnyResConfig(crop_size=crop, variance_k=k))
        kept = select_top_k(expected_std, k)
        assert out.kept.tolist() == kept.tolist() and out.n_crops == 1 + min(k, 6)
        np.testing.assert_array_equal(out.crops[1:], full.crops[1:][kept])
        if k <= 3:
            assert set(out.kept.tolist()) <= set(busy)


def test_more_crops_than_max_names_the_file(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (12, 8), (1, 2, 3)).save(path)
    with pytest.raises(ImageError) as err:
        process_image(path, AnyResConfig(crop_size=4, max_crops=5))
    assert str(path) in str(err.value) and "max_crops=5" in str(err.value)
    ok = process_image(path, AnyResConfig(crop_size=4, max_crops=5, variance_k=4))
    assert ok.n_crops == 5


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of crop_size"):
        AnyResConfig(crop_size=336, pinpoints=((336, 400),))
    with pytest.raises(ValueError, match="variance_k"):
        AnyResConfig(variance_k=-1)
    cfg = AnyResConfig(crop_size=4, variance_k=2)
    assert AnyResConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown AnyResConfig fields"):
        AnyResConfig.from_dict({"crop": 3})


def test_stack_images_pads_and_masks(seed):
    a, b = torch.randn(3, 3, 4, 4), torch.randn(1, 3, 4, 4)
    pixels, mask = stack_images([a, None, b])
    assert pixels.shape == (3, 3, 3, 4, 4)
    assert mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    torch.testing.assert_close(pixels[0], a)
    torch.testing.assert_close(pixels[2, 0], b[0])
    assert (pixels[1] == 0).all() and (pixels[2, 1:] == 0).all()
    with pytest.raises(ValueError, match="different sizes"):
        stack_images([a, torch.randn(1, 3, 5, 5)])
