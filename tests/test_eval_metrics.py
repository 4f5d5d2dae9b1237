"""Evaluation metrics on a known tiny set, the Evaluator's loss against a plain
computation, and generation metrics through a model that answers what it is told."""

import pytest
import torch

from fastencdec import EncDecConfig, EncoderDecoderLM
from fastencdec.data import Seq2SeqCollator
from fastencdec.training import Evaluator
from fastencdec.training.evaluation import (
    exact_match_score,
    generation_metrics,
    normalize_answer,
    rouge_l,
    token_f1,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_normalisation_is_squad_style():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple and a pear") == "apple and pear"


# (prediction, reference, exact match, token F1, ROUGE-L), worked out by hand
KNOWN = [
    ("Lisbon", "lisbon.", 1.0, 1.0, 1.0),
    ("in Lisbon", "Lisbon", 0.0, 2 * 0.5 * 1.0 / 1.5, 2 * 0.5 * 1.0 / 1.5),
    ("Paris", "Lisbon", 0.0, 0.0, 0.0),
    # F1 counts overlap as a bag, ROUGE-L needs the order: "a b c" vs "c b a"
    ("cat dog fish", "fish dog cat", 0.0, 1.0, 1 / 3),
    ("the big red car", "red car", 0.0, 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0),
     2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),
    ("", "", 1.0, 1.0, 1.0),
    ("a", "Lisbon", 0.0, 0.0, 0.0),  # "a" normalises to nothing
]


@pytest.mark.parametrize("pred,ref,em,f1,rl", KNOWN)
def test_metrics_on_known_pairs(pred, ref, em, f1, rl):
    assert exact_match_score(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1)
    assert rouge_l(pred, ref) == pytest.approx(rl)


def test_generation_metrics_are_means():
    preds, refs = [p for p, *_ in KNOWN], [r for _, r, *_ in KNOWN]
    out = generation_metrics(preds, refs)
    for key, col in (("exact_match", 2), ("token_f1", 3), ("rouge_l", 4)):
        assert out[key] == pytest.approx(sum(k[col] for k in KNOWN) / len(KNOWN))
    with pytest.raises(ValueError, match="references"):
        generation_metrics(["a"], [])


def test_rouge_l_against_brute_force_lcs(seed):
    import itertools
    import random

    rng = random.Random(seed)
    words = "a1 b2 c3 d4 e5".split()
    for _ in range(30):
        x = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        y = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        best = 0
        for k in range(len(x), 0, -1):  # longest subsequence of x that is one of y
            if any(_is_subsequence(c, y) for c in itertools.combinations(x, k)):
                best = k
                break
        expected = 0.0 if best == 0 else 2 * (best / len(x)) * (best / len(y)) / (
            best / len(x) + best / len(y))
        assert rouge_l(" ".join(x), " ".join(y)) == pytest.approx(expected)


def _is_subsequence(seq, other):
    it = iter(other)
    return all(tok in it for tok in seq)


class Parrot:
    """A tokenizer stand-in whose ids are letters' positions (a=5, b=6, ...)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def pad(self, seqs):
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = True
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, ids):
        out = []
        for row in ids.tolist():
            row = row[:row.index(2)] if 2 in row else row
            out.append("".join(chr(ord("a") + i - 5) for i in row if i >= 5))
        return out


class EchoModel(EncoderDecoderLM):
    """Generates its input back (a perfect 'answerer' when the answer is the input)."""

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id):
        return input_ids.masked_fill(~attention_mask, 0)[:, :max_new_tokens]


def test_evaluator_loss_and_generation_metrics(seed):
    torch.manual_seed(seed)
    model = EchoModel(EncDecConfig.preset("tiny").replace(vocab_size=40))
    exs = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7, 2]},     # "abc"
           {"input_ids": [8, 9], "labels": [8, 9, 2]},           # "de"
           {"input_ids": [10], "labels": [11, 2]}]               # input "f", answer "g"
    refs = ["abc", "de", "g"]
    evaluator = Evaluator(exs, Seq2SeqCollator(), references=refs, tokenizer=Parrot(),
                          batch_size=2, max_new_tokens=8)
    result = evaluator(model)
    assert evaluator.predictions == ["abc", "de", "f"]
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["examples"] == 3
    # the held-out loss is the plain CE over all real target tokens
    batch = Seq2SeqCollator()(exs)
    with torch.no_grad():
        logits = EncoderDecoderLM.forward(model, batch["input_ids"], batch["attention_mask"],
                                          batch["decoder_input_ids"],
                                          batch["decoder_attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 40),
                                                 batch["labels"].reshape(-1))
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert model.training  # left as it was
    with pytest.raises(ValueError, match="empty"):
        Evaluator([], Seq2SeqCollator())
