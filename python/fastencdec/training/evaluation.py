"""Held-out evaluation: cross-entropy per target token and generation metrics.

Generation metrics compare the greedy answer with the reference after SQuAD's
normalisation (lower case, no punctuation, no articles, single spaces):

- ``exact_match``: share of answers equal to the reference;
- ``token_f1``: SQuAD's token-overlap F1, averaged over examples;
- ``rouge_l``: ROUGE-L F-measure (longest common token subsequence), as the paper
  reports.

:class:`Evaluator` runs both on a fixed set; the trainer calls it every
``eval_every`` steps and ``fastencdec eval`` calls it on a saved model.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..argcheck import positive_int
from .objective import StudentLoss

__all__ = ["normalize_answer", "exact_match_score", "token_f1", "rouge_l", "generation_metrics",
           "Evaluator"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(references), 1)
    return {
        "exact_match": sum(map(exact_match_score, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
    }


class Evaluator:
    """Evaluate a model on fixed held-out examples.

    ``examples``: encoded examples (``{"input_ids", "labels"}``) and ``collate`` (e.g.
    :class:`~fastencdec.data.Seq2SeqCollator`) for the held-out loss. With
    ``references`` (the target strings, one per example) and ``tokenizer`` it also
    generates greedily (``max_new_tokens``) and scores the answers.
    """

    def __init__(self, examples: Sequence[dict], collate: Callable, *,
                 references: Sequence[str] | None = None, tokenizer=None,
                 batch_size: int = 32, max_new_tokens: int = 32):
        if len(examples) == 0:
            raise ValueError("the evaluation set is empty")
        if references is not None and len(references) != len(examples):
            raise ValueError(f"{len(references)} references for {len(examples)} examples")
        if references is not None and tokenizer is None:
            raise ValueError("generation metrics need the tokenizer")
        batch_size = positive_int("batch_size", batch_size)
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        self.examples = list(examples)
        self.collate = collate
        self.references = None if references is None else list(references)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.predictions: list[str] = []

    def _batches(self):
        for start in range(0, len(self.examples), self.batch_size):
            yield start, self.examples[start:start + self.batch_size]

    @torch.no_grad()
    def __call__(self, model) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            loss_sum, tokens = 0.0, 0
            scorer = StudentLoss(model)
            for _, chunk in self._batches():
                batch = {k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in self.collate(chunk).items()}
                loss, n = scorer(batch)
                loss_sum += float(loss) * n
                tokens += n
            result = {"loss": loss_sum / max(tokens, 1), "examples": len(self.examples)}
            if self.references is not None:
                self.predictions = self.generate(model, device)
                result.update(generation_metrics(self.predictions, self.references))
            return result
        finally:
            model.train(was_training)

    def generate(self, model, device) -> list[str]:
        """Greedy answers; examples with ``image_crops`` hand their images to a
        vision-language model, which puts the image tokens before the prompt (as
        ``fastencdec generate --image`` does)."""
        tok, out = self.tokenizer, []
        for _, chunk in self._batches():
            batch = tok.pad([ex["input_ids"] for ex in chunk])
            ids = model.generate(batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device),
                                 max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_id,
                                 **_image_kwargs(model, chunk, device))
            out += [text.strip() for text in tok.batch_decode(ids.cpu())]
        return out


def _image_kwargs(model, examples, device) -> dict:
    if not any("image_crops" in ex for ex in examples):
        return {}
    anyres = getattr(getattr(model, "config", None), "anyres", None)
    if anyres is None:
        raise ValueError(f"the evaluation examples hold images but {type(model).__name__} is "
                         "not a vision-language model")
    from ..vision.data import collate_images

    images = collate_images(examples, anyres)
    if images is None:
        return {}
    pixels, crop_mask = images
    return {"image_pixels": pixels.to(device), "image_crop_mask": crop_mask.to(device)}
