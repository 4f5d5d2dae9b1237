"""Write synthetic visual QA (coloured shapes on mostly flat canvases, the images of
``fastencdec demo --vision``) as image + text JSONL for examples/finetune_image_text.yaml.

    python examples/make_synthetic_images.py   # -> examples/data/vqa/{train,valid,test}.jsonl
                                               #    and examples/data/vqa/images/*.png

Each row is ``{"image": "images/<split>_<n>.png", "source": question, "target": answer}``;
image paths are relative to the JSONL file, as ``data.format: image_text`` reads them.
"""

import json
import os
import sys

from fastencdec.vision.synthetic import VisualQA

SPLITS = (("train", 2000), ("valid", 100), ("test", 100))


def main(out_dir: str = os.path.join(os.path.dirname(__file__), "data", "vqa")) -> None:
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    # 32-pixel cells: the tiny vision tower's crop size, one shape per crop
    task = VisualQA(cell=32, canvases=((3, 2), (2, 3), (2, 2)), seed=0)
    for split, n in SPLITS:
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for i, ex in enumerate(task.generate(n, split=split)):
                name = f"{split}_{i:05d}.png"
                ex["image"].save(os.path.join(images, name))
                fh.write(json.dumps({"image": f"images/{name}", "source": ex["source"],
                                     "target": ex["target"]}) + "\n")
        print(f"wrote {n} image-text rows to {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
