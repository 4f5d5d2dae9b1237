"""Vision-language models trained by the project's Trainer from an image + text JSONL
file: both architectures, the two stages (frozen parts stay put), and distillation
from a fastencdec vision-language teacher."""

import json

import pytest
import torch

from fastencdec import DecoderOnlyConfig, EncDecConfig
from fastencdec.data import BatchStream, LengthBucketBatchSampler, Seq2SeqEncoder
from fastencdec.training import Trainer
from fastencdec.training.config import TrainConfig
from fastencdec.vision.anyres import AnyResConfig
from fastencdec.vision.config import VLMConfig
from fastencdec.vision.data import ImageTextCollator, load_image_text_examples
from fastencdec.vision.models import DecoderOnlyVLM, EncoderDecoderVLM
from fastencdec.vision.synthetic import VisualQA
from fastencdec.vision.tower import VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = VisionConfig.preset("tiny")
ANYRES = AnyResConfig(crop_size=32)
TEXT = EncDecConfig.preset("tiny")  # vocab 512: byte ids + 4 fit


class ByteTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, *, add_eos=False, max_length=None):
        ids = [b + 4 for b in text.encode()][:max_length]
        return ids + [self.eos_id] if add_eos else ids


@pytest.fixture(scope="module")
def stream_factory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    rows = []
    for i, ex in enumerate(VisualQA(cell=32, seed=3).generate(12)):
        ex["image"].save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "source": ex["source"],
                                "target": ex["target"]}))
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    encoder = Seq2SeqEncoder(ByteTokenizer(), max_source_len=40, max_target_len=8)
    examples, bad = load_image_text_examples(folder / "train.jsonl", encoder, ANYRES)
    assert not bad and len(examples) == 12

    def make():
        collate = ImageTextCollator(ANYRES, tokens_per_crop=VISION.tokens_per_crop)
        sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in examples], 4, seed=0)
        return BatchStream(examples, sampler, collate)

    return make


def _vlm(arch):
    torch.manual_seed(0)
    if arch == "encdec":
        return EncoderDecoderVLM(VLMConfig(text=TEXT, vision=VISION, anyres=ANYRES))
    return DecoderOnlyVLM(VLMConfig(text=DecoderOnlyConfig.twin_of(TEXT), vision=VISION,
                                    anyres=ANYRES))


def _config(**kw):
    return TrainConfig(**{**dict(task="finetune", max_steps=6, warmup_steps=1, lr=3e-3,
                                 optimizer="adamw", progress=False), **kw})


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_trainer_trains_a_vlm(stream_factory, arch):
    model = _vlm(arch)
    batch = next(stream_factory())
    assert batch["image_slots"] is True and batch["image_pixels"].shape[2:] == (3, 32, 32)
    trainer = Trainer(model, _config(), stream_factory(), device="cpu")
    history = trainer.train()
    losses = [r["loss"] for r in history]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_stage_one_trains_the_projector_only(stream_factory):
    model = _vlm("encdec").set_trainable(vision=False, projector=True, lm=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, _config(max_steps=2), stream_factory(), device="cpu").train()
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector"}


def test_distill_from_a_vlm_teacher(stream_factory):
    teacher = _vlm("deconly").eval()
    student = _vlm("encdec")
    cfg = _config(task="distill", max_steps=3, alpha=0.5)
    history = Trainer(student, cfg, stream_factory(), teacher=teacher, device="cpu").train()
    assert len(history) == 3 and all(r["loss"] > 0 for r in history)
