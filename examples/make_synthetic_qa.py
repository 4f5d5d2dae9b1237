"""Write the demo's synthetic QA task as JSONL files for the example run configs.

    python examples/make_synthetic_qa.py    # -> examples/data/qa_{train,valid,test}.jsonl, text.txt
"""

import json
import os
import sys

from fastencdec.data import SyntheticQA


def main(out_dir: str = os.path.join(os.path.dirname(__file__), "data")) -> None:
    os.makedirs(out_dir, exist_ok=True)
    task = SyntheticQA()  # the demo's task
    for split, n in (("train", 6000), ("valid", 200), ("test", 200)):
        path = os.path.join(out_dir, f"qa_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for ex in task.generate(n, split=split):
                fh.write(json.dumps({"question": ex["question"], "context": ex["context"],
                                     "answer": ex["target"]}) + "\n")
        print(f"wrote {n} examples to {path}")
    path = os.path.join(out_dir, "text.txt")
    with open(path, "w", encoding="utf-8") as fh:
        for ex in task.generate(3000, split="text"):
            fh.write(ex["context"] + "\n")
    print(f"wrote raw text for span-corruption pretraining to {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
