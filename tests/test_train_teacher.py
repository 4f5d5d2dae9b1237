"""The teacher side of distillation: hidden states + LM head through the fused loss
(never the full teacher logits) equal the logits path, for fastencdec and Hugging Face
teachers; only the needed positions are kept; vocabularies must match."""

import functools
import json

import pytest
import torch

from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.data import Seq2SeqCollator
from fastencdec.training import StudentLoss, TeacherHidden, TrainConfig, Trainer
from fastencdec.training.teacher import hf_hidden_path, teacher_logits_for, teacher_targets

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def batch_for(seed, n=4, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for _ in range(n):
        src = torch.randint(5, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        tgt = torch.randint(5, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        exs.append({"input_ids": src.tolist(), "labels": tgt.tolist() + [2]})
    return Seq2SeqCollator()(exs)


def models(seed, teacher_vocab=VOCAB):
    torch.manual_seed(seed)
    student = EncoderDecoderLM(EncDecConfig.preset("tiny").replace(vocab_size=VOCAB))
    teacher = DecoderOnlyLM(DecoderOnlyConfig.twin_of(
        EncDecConfig.preset("tiny").replace(vocab_size=teacher_vocab)))
    return student, teacher.eval()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_hidden_path_equals_logits_path(seed, divergence):
    student, teacher = models(seed)
    batch = batch_for(seed % 10_000)
    target = teacher_targets(teacher, batch, pad_id=0)
    assert isinstance(target, TeacherHidden)
    assert target.hidden.shape[:2] == batch["labels"].shape  # only the Ly positions
    assert target.head_weight is teacher.lm_head.weight
    full = teacher(*_teacher_inputs(batch)).logits  # plain: every position's logits
    aligned = _aligned(full, batch)
    torch.testing.assert_close(teacher_logits_for(teacher, batch, 0), aligned,
                               rtol=1e-5, atol=1e-5)
    loss = StudentLoss(student, alpha=0.7, temperature=1.5, divergence=divergence)
    via_hidden, n = loss(batch, target)
    via_logits, _ = loss(batch, aligned)
    torch.testing.assert_close(via_hidden, via_logits, rtol=1e-5, atol=1e-6)
    assert n == int((batch["labels"] != -100).sum())


def _teacher_inputs(batch):
    from fastencdec.training.objective import causal_lm_inputs

    inputs = causal_lm_inputs(batch, 0)
    return inputs.input_ids, inputs.attention_mask


def _aligned(logits, batch):
    lx, ly = batch["input_ids"].shape[1], batch["labels"].shape[1]
    return logits[:, lx - 1:lx - 1 + ly]


def test_vocab_map_reorders_the_teacher_head(seed):
    student, teacher = models(seed, teacher_vocab=VOCAB + 6)
    batch = batch_for(seed % 10_000)
    perm = torch.randperm(VOCAB + 6, generator=torch.Generator().manual_seed(seed))[:VOCAB]
    mapped = teacher_targets(teacher, batch, 0, vocab_map=perm)
    plain = teacher_logits_for(teacher, batch, 0)
    logits = mapped.hidden @ mapped.head_weight.t()
    torch.testing.assert_close(logits, plain[..., perm], rtol=1e-5, atol=1e-5)


def test_a_teacher_with_a_smaller_vocabulary_is_refused():
    student, teacher = models(0, teacher_vocab=VOCAB - 4)
    with pytest.raises(ValueError, match="teacher's vocabulary \\(60\\) is smaller"):
        Trainer(student, TrainConfig(task="distill", max_steps=1, progress=False), iter([]),
                teacher=teacher, device="cpu")


# ----------------------------------------------------------------- Hugging Face teachers
def tiny_llama(seed, vocab=VOCAB):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_teacher_hidden_path_equals_its_logits(seed):
    teacher = tiny_llama(seed)
    assert hf_hidden_path(teacher) is not None
    batch = batch_for(seed % 10_000)
    target = teacher_targets(teacher, batch, 0)
    assert isinstance(target, TeacherHidden)
    from fastencdec.training.objective import causal_lm_inputs

    inputs = causal_lm_inputs(batch, 0)  # x left-padded: positions come from the mask
    with torch.no_grad():
        full = teacher(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask.long(),
                       position_ids=inputs.position_ids).logits
    expected = _aligned(full, batch)
    real = batch["labels"] != -100
    got = target.hidden @ target.head_weight.t()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_hf_teacher_logits_fallback_keeps_only_the_needed_positions(seed, monkeypatch):
    teacher = tiny_llama(seed)
    batch = batch_for(seed % 10_000)
    hidden = teacher_targets(teacher, batch, 0)
    calls = []
    plain_forward = teacher.forward

    @functools.wraps(plain_forward)  # keeps the signature the code inspects
    def recording_forward(*args, **kwargs):
        calls.append(kwargs.get("logits_to_keep"))
        return plain_forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", recording_forward)
    monkeypatch.setattr("fastencdec.training.teacher.hf_hidden_path", lambda model: None)
    logits = teacher_targets(teacher, batch, 0)
    assert calls == [batch["labels"].shape[1] + 1]
    assert logits.shape[:2] == batch["labels"].shape
    real = batch["labels"] != -100
    torch.testing.assert_close(logits[real], (hidden.hidden @ hidden.head_weight.t())[real],
                               rtol=1e-4, atol=1e-5)


def test_distilling_from_an_hf_teacher_trains(seed):
    teacher = tiny_llama(seed)
    student, _ = models(seed)
    batches = [batch_for(seed % 10_000 + i) for i in range(3)]

    class Cycle:
        i = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            return batches[self.i % 3]

    cfg = TrainConfig(task="distill", alpha=1.0, max_steps=15, lr=1e-2, warmup_steps=1,
                      progress=False)
    history = Trainer(student, cfg, Cycle(), teacher=teacher, device="cpu").train()
    assert history[-1]["kl"] < 0.7 * history[0]["kl"]


# ----------------------------------------------------------------- tokenizers must match
def _json_tokenizer_dir(path, texts, vocab):
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab,
                                             special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tk.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def test_hf_teacher_must_share_the_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastencdec.data import load_tokenizer
    from fastencdec.training.checks import ConfigError
    from fastencdec.training.run_config import _teacher_vocab_map

    texts = ["the cat sat on the mat", "a dog ran in the park", "where does the cat live"] * 20
    teacher_dir = _json_tokenizer_dir(tmp_path / "teacher", texts, 60)
    student_tok = load_tokenizer(teacher_dir)  # the student uses the teacher's tokenizer.json
    assert (student_tok.pad_id, student_tok.bos_id, student_tok.eos_id) == (0, 1, 2)
    assert student_tok.decode(student_tok.encode("the cat sat")) == "the cat sat"
    spec = {"hf": str(teacher_dir), "vocab": "identical"}
    assert transformers.AutoTokenizer.from_pretrained(str(teacher_dir)) is not None
    assert _teacher_vocab_map(spec, student_tok) is None  # identical: accepted
    other = load_tokenizer(_json_tokenizer_dir(tmp_path / "other", [t[::-1] for t in texts], 60))
    with pytest.raises(ConfigError, match="the teacher's tokenizer differs"):
        _teacher_vocab_map(spec, other)
    assert _teacher_vocab_map({**spec, "vocab": "prefix"}, other) is None  # explicit opt-in
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(list(range(other.vocab_size))))
    vmap = _teacher_vocab_map({**spec, "vocab": str(mapping)}, other)
    assert vmap.tolist() == list(range(other.vocab_size))
    mapping.write_text(json.dumps([0, 1]))
    with pytest.raises(ConfigError, match="must list"):
        _teacher_vocab_map({**spec, "vocab": str(mapping)}, other)
