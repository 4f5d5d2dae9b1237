"""Image + text JSONL: paths relative to the file, bad rows reported by row number and
skipped (counted) or refused before training, and the collated batch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastencdec.data import Seq2SeqEncoder
from fastencdec.vision.anyres import AnyResConfig, normalize, process_image
from fastencdec.vision.data import (
    ImageTextCollator,
    load_image_text_examples,
    read_image_text_jsonl,
)

ANYRES = AnyResConfig(crop_size=8)


class CharTokenizer:
    """Ids = byte values + 4 (pad 0, bos 1, eos 2)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, *, add_eos=False, max_length=None):
        ids = [b + 4 for b in text.encode()]
        if add_eos:
            ids.append(self.eos_id)
        return ids if max_length is None else ids[:max_length]


def _write(tmp_path, rows, images):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, size in images.items():
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "imgs" / name)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _encoder():
    return Seq2SeqEncoder(CharTokenizer(), max_source_len=32, max_target_len=8)


def test_rows_read_relative_to_the_file(tmp_path):
    path = _write(tmp_path, [{"image": "imgs/a.png", "source": "q?", "target": "red"}],
                  {"a.png": (16, 8)})
    data = read_image_text_jsonl(path)
    assert not data.bad and data.records[0]["image"] == str(tmp_path / "imgs" / "a.png")
    examples, bad = load_image_text_examples(path, _encoder(), ANYRES)
    assert bad == [] and len(examples) == 1
    ex = examples[0]
    assert ex["input_ids"] == [ord("q") + 4, ord("?") + 4]
    assert ex["labels"] == [ord(c) + 4 for c in "red"] + [2]
    np.testing.assert_array_equal(ex["image_crops"],
                                  process_image(tmp_path / "imgs" / "a.png", ANYRES).crops)


def _bad_rows_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    rows = [
        {"image": "imgs/a.png", "source": "q1", "target": "t1"},          # 1 good
        {"source": "q2", "target": "t2"},                                  # 2 no image field
        {"image": "imgs/missing.png", "source": "q3", "target": "t3"},    # 3 missing file
        "{not json",                                                       # 4 invalid JSON
        {"image": "imgs/empty.png", "source": "q5", "target": "t5"},      # 5 empty file
        {"image": "imgs/b.png", "source": "q6", "target": "t6"},          # 6 good
    ]
    return _write(tmp_path, rows, {"a.png": (8, 8), "b.png": (20, 9)})


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = _bad_rows_file(tmp_path)
    with pytest.warns(UserWarning, match="skipped 4 bad image-text row"):
        examples, bad = load_image_text_examples(path, _encoder(), ANYRES)
    assert [ex["row"] for ex in examples] == [1, 6]
    assert [b.row for b in bad] == [2, 3, 4, 5]
    reasons = [str(b) for b in bad]
    assert "missing field(s) ['image']" in reasons[0]
    assert "missing.png: image file not found" in reasons[1]
    assert "invalid JSON" in reasons[2]
    assert "empty.png: empty file" in reasons[3]
    assert all(r.startswith(f"{path}:") for r in reasons)


def test_bad_rows_can_stop_before_training(tmp_path):
    path = _bad_rows_file(tmp_path)
    with pytest.raises(ValueError, match=r"4 bad image-text row\(s\), nothing trained") as err:
        load_image_text_examples(path, _encoder(), ANYRES, on_bad_row="error")
    assert f"{path}:2:" in str(err.value)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_image_text_examples(path, _encoder(), ANYRES, on_bad_row="ignore")


def test_too_many_crops_is_a_bad_row(tmp_path):
    path = _write(tmp_path, [{"image": "imgs/wide.png", "source": "q", "target": "t"}],
                  {"wide.png": (24, 16)})
    with pytest.raises(ValueError, match="max_crops=3"):
        load_image_text_examples(path, _encoder(), AnyResConfig(crop_size=8, max_crops=3),
                                 on_bad_row="error")


def test_collator_pads_crops(tmp_path):
    path = _write(tmp_path, [{"image": "imgs/a.png", "source": "ab", "target": "x"},
                             {"image": "imgs/b.png", "source": "abcd", "target": "yz"}],
                  {"a.png": (8, 8), "b.png": (24, 16)})
    examples, _ = load_image_text_examples(path, _encoder(), ANYRES)
    batch = ImageTextCollator(ANYRES)(examples)
    assert batch["image_pixels"].shape == (2, 7, 3, 8, 8)
    assert batch["image_crop_mask"].tolist() == [[True, True] + [False] * 5, [True] * 7]
    torch.testing.assert_close(batch["image_pixels"][1], normalize(examples[1]["image_crops"]))
    assert (batch["image_pixels"][0, 2:] == 0).all()
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].shape == (2, 3)
    assert batch["labels"][0].tolist() == [ord("x") + 4, 2, -100]
