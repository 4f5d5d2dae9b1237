"""Seq2seq examples ``{source, target}``, the reference QA prompt, and their encoding.

An encoded example is ``{"input_ids": [...], "labels": [...]}``: the source ids and
the target ids ending with EOS. QA examples keep the whole question when the
input is too long: the context is what gets cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "QA_PROMPT",
    "format_qa_prompt",
    "to_seq2seq",
    "qa_to_seq2seq",
    "seq2seq_record",
    "qa_record",
    "Seq2SeqEncoder",
]

# The reference checkpoint's QA format (the model continues after "###Answer\n").
QA_PROMPT = ("Answer the following question based only on the context.\n"
             "###Question\n{question}\n###Context\n{context}\n###Answer\n")


def format_qa_prompt(question: str, context: str) -> str:
    return QA_PROMPT.format(question=question, context=context)


def _first_answer(answer) -> str:
    # SQuAD-style {"text": [...]} or a list of answers: train on the first one.
    if isinstance(answer, Mapping):
        answer = answer.get("text", "")
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else ""
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, a list of str or {{'text': [...]}}, "
                        f"got {type(answer).__name__}")
    return answer


def seq2seq_record(rec: Mapping, *, source_field: str = "source",
                   target_field: str = "target", index: int | None = None) -> dict:
    """``{source, target}`` out of one record with other field names."""
    for field in (source_field, target_field):
        if field not in rec:
            where = "a record" if index is None else f"record {index}"
            raise KeyError(f"{where} has no field {field!r} (fields: {sorted(rec)})")
    return {"source": str(rec[source_field]), "target": str(rec[target_field])}


def qa_record(rec: Mapping, *, question_field: str = "question",
              context_field: str = "context", answer_field: str = "answer",
              index: int | None = None) -> dict:
    """``{question, context, target}`` out of one QA record (the source is built at
    encode time so that truncation can shorten the context only)."""
    for field in (question_field, context_field, answer_field):
        if field not in rec:
            where = "a record" if index is None else f"record {index}"
            raise KeyError(f"{where} has no field {field!r} (fields: {sorted(rec)})")
    return {"question": str(rec[question_field]), "context": str(rec[context_field]),
            "target": _first_answer(rec[answer_field])}


def to_seq2seq(records: Iterable[Mapping], *, source_field: str = "source",
               target_field: str = "target") -> list[dict]:
    """Pick ``{source, target}`` out of records with other field names."""
    return [seq2seq_record(rec, source_field=source_field, target_field=target_field, index=i)
            for i, rec in enumerate(records)]


def qa_to_seq2seq(records: Iterable[Mapping], *, question_field: str = "question",
                  context_field: str = "context", answer_field: str = "answer") -> list[dict]:
    """QA records -> ``{question, context, target}`` (see :func:`qa_record`)."""
    return [qa_record(rec, question_field=question_field, context_field=context_field,
                      answer_field=answer_field, index=i) for i, rec in enumerate(records)]


class Seq2SeqEncoder:
    """Turns ``{source, target}`` or ``{question, context, target}`` into ids.

    ``max_source_len`` / ``max_target_len`` bound the encoded lengths (the target's
    EOS is kept when it is cut).
    """

    def __init__(self, tokenizer, *, max_source_len: int = 512, max_target_len: int = 128):
        if max_source_len < 1 or max_target_len < 1:
            raise ValueError("max_source_len and max_target_len must be >= 1, got "
                             f"{max_source_len} and {max_target_len}")
        self.tokenizer = tokenizer
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len

    def source_ids(self, example: Mapping) -> list[int]:
        if "question" in example and "context" in example:
            return self.qa_source_ids(example["question"], example["context"])
        if "source" not in example:
            raise KeyError("an example needs 'source' (or 'question' and 'context'), "
                           f"got fields {sorted(example)}")
        return self.tokenizer.encode(example["source"], max_length=self.max_source_len)

    def target_ids(self, target: str) -> list[int]:
        return self.tokenizer.encode(target, add_eos=True, max_length=self.max_target_len)

    def __call__(self, example: Mapping) -> dict:
        if "target" not in example:
            raise KeyError(f"an example needs 'target', got fields {sorted(example)}")
        return {"input_ids": self.source_ids(example),
                "labels": self.target_ids(example["target"])}

    def encode_all(self, examples: Iterable[Mapping]) -> list[dict]:
        return [self(ex) for ex in examples]

    def qa_source_ids(self, question: str, context: str) -> list[int]:
        """The QA prompt's ids, at most ``max_source_len``; the context is cut first."""
        tok, limit = self.tokenizer, self.max_source_len
        ids = tok.encode(format_qa_prompt(question, context))
        if len(ids) <= limit:
            return ids
        # Shorten the context (in tokens, re-encoding the whole prompt so that the
        # ids are exactly those of a plain prompt with a shorter context).
        ctx = tok.encode(context)
        keep = max(len(ctx) - (len(ids) - limit), 0)
        while keep > 0:
            ids = tok.encode(format_qa_prompt(question, tok.decode(ctx[:keep])))
            if len(ids) <= limit:
                return ids
            keep -= max(len(ids) - limit, 1)
        # Even the question alone does not fit: cut it, but keep the answer cue.
        head = tok.encode(format_qa_prompt(question, "").split("###Context")[0])
        tail = tok.encode("###Context\n###Answer\n")
        return head[: max(limit - len(tail), 0)] + tail[-limit:]
