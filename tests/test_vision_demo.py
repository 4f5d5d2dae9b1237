"""``fastencdec demo --vision --quick`` end to end, then ``fastencdec generate --image``
with one of the models it saved; the synthetic task's drawings."""

import json

import numpy as np
import pytest

from fastencdec import cli
from fastencdec.vision.anyres import AnyResConfig, process_image
from fastencdec.vision.synthetic import COLOURS, NUMBERS, QUESTIONS, VisualQA

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_images_are_mostly_flat(seed):
    examples = VisualQA(cell=32, seed=seed).generate(40)
    cfg = AnyResConfig(crop_size=32, pinpoints=((64, 64), (96, 64), (64, 96), (96, 96)))
    empty = 0
    for ex in examples:
        assert ex["source"] in QUESTIONS
        assert ex["target"] in (COLOURS if ex["source"] == QUESTIONS[0] else NUMBERS)
        crops = process_image(ex["image"], cfg)
        empty += int((crops.stds == 0).sum())
        assert (crops.stds > 0).sum() >= 1  # the triangle's crop
        # the triangle's colour is drawn somewhere when it is asked for
        if ex["source"] == QUESTIONS[0]:
            pixels = np.asarray(ex["image"]).reshape(-1, 3)
            assert (pixels == COLOURS[ex["target"]]).all(axis=1).any()
    assert empty >= len(examples)  # at least one empty crop per image on average
    again = VisualQA(cell=32, seed=seed).generate(40)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
               and a["target"] == b["target"] for a, b in zip(examples, again, strict=True))


def test_vision_demo_quick_and_generate_with_image(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--vision", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("encoder-decoder, all crops", "decoder-only, all crops",
                 "encoder-decoder, base + top-2 crops", "majority answer per question",
                 "first token (ms)", "the encoder-decoder VLM generates faster"):
        assert name in text
    assert sum(line.startswith(("SHOWN:", "NOT SHOWN:")) for line in text.splitlines()) == 3
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 3
    full, sel = runs["encoder-decoder, all crops"], runs["encoder-decoder, base + top-2 crops"]
    assert sel["image_tokens"] < full["image_tokens"]
    assert runs["decoder-only, all crops"]["image_tokens"] == full["image_tokens"]
    for run in runs.values():
        assert 0.0 <= run["em"] <= 1.0 and run["steps"] == 12
        assert run["losses"][-1] < run["losses"][0]
    params = [r["params"] for r in runs.values()]
    assert abs(params[0] - params[1]) / params[0] < 0.1  # equal size, up to whole layers
    for r in results["speed"].values():
        assert r["first_token_ms"] > 0 and r["tokens_per_s"] > 0

    image = tmp_path / "q.png"
    VisualQA(cell=32, seed=1).generate(1)[0]["image"].save(image)
    capsys.readouterr()
    model_dir = out / "models" / "vlm-0"
    assert cli.main(["generate", "--model", str(model_dir), "--image", str(image), "--prompt",
                     "how many circles?", "--prompt", "what colour is the triangle?",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # a bad image: one line naming the file, exit code 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert cli.main(["generate", "--model", str(model_dir), "--image", str(bad), "--prompt",
                     "how many circles?", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "empty file" in err and len(err.strip().splitlines()) == 1
