"""Image loading: modes converted to RGB exactly, EXIF orientation, and one clear
error line naming the file for every kind of bad input."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastencdec.vision.image_io import ImageError, load_image


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _one_line_naming(err, path):
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_rgb_roundtrip_exact(tmp_path, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    img = load_image(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (11, 7)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grayscale_and_palette(tmp_path, seed):
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    out = np.asarray(load_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png")))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = np.asarray(load_image(_save(pal, tmp_path / "p.png")))
    assert out[0, 1].tolist() == [200, 100, 50] and out[1, 2].tolist() == [10, 20, 30]


def test_transparency_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)    # opaque red
    rgba[0, 1] = (255, 0, 0, 0)      # invisible red: white
    rgba[1, 0] = (0, 0, 255, 51)     # 20 % blue: 0.2 * 255 + 0.8 * 255 = 255 for B
    rgba[1, 1] = (0, 0, 0, 128)      # half black: 255 * (1 - 128/255) = 127
    out = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [204, 204, 255]
    assert out[1, 1].tolist() == [127, 127, 127]
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA")
    out = np.asarray(load_image(_save(la, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [100] * 3 and out[0, 1].tolist() == [255] * 3
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = np.asarray(load_image(_save(pal, tmp_path / "pt.png", transparency=0)))
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [9] * 3


def test_sixteen_bit_rescaled(tmp_path):
    img = Image.new("I;16", (4, 1))
    for x, value in enumerate([0, 257, 65535, 32896]):
        img.putpixel((x, 0), value)
    out = np.asarray(load_image(_save(img, tmp_path / "deep.png")))
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))     # cyan
    img.putpixel((1, 0), (0, 0, 0, 255))     # black
    img.putpixel((2, 0), (0, 0, 0, 0))       # white (no ink)
    out = np.asarray(load_image(_save(img, tmp_path / "c.tif")))
    assert out[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0)   # left half red
    arr[:, 4:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6           # "rotate 90 degrees clockwise to display"
    img = load_image(_save(Image.fromarray(arr), tmp_path / "rot.png", exif=exif))
    out = np.asarray(img)
    assert img.size == (4, 8)  # now portrait
    assert (out[:4] == (255, 0, 0)).all() and (out[4:] == (0, 0, 255)).all()


def test_one_pixel_image_is_loaded(tmp_path):
    img = load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "dot.png"))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated_png",
                                  "truncated_jpeg", "float", "directory"])
def test_bad_files_one_clear_line(tmp_path, kind):
    path = tmp_path / f"bad-{kind}.img"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not an image\n")
    elif kind in ("truncated_png", "truncated_jpeg"):
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path, format="PNG" if kind == "truncated_png" else "JPEG")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "float":
        Image.fromarray(np.ones((2, 2), np.float32), "F").save(path, format="TIFF")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(ImageError) as err:
        load_image(path)
    message = _one_line_naming(err, path)
    expected = {"missing": "not found", "empty": "empty file", "text": "not an image",
                "truncated_png": "truncated", "truncated_jpeg": "truncated",
                "float": "mode F", "directory": "not a file"}[kind]
    assert expected in message


def _png_with_size(path, width, height):
    """A PNG whose header claims width x height (the pixel data is a stub)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused(tmp_path):
    bomb = _png_with_size(tmp_path / "bomb.png", 20000, 20000)  # 400M pixels
    with pytest.raises(ImageError) as err:
        load_image(bomb)
    assert "decompression-bomb" in _one_line_naming(err, bomb)
    small = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    with pytest.raises(ImageError, match="400 pixels exceeds"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).size == (20, 20)
