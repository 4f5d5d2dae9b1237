"""Data pipeline: QA prompt, truncation keeping the question, collation, bucketing,
the resumable batch stream, and loading local files / hub names."""

import json

import pytest
import torch

from fastencdec.data import (
    QA_PROMPT,
    BatchStream,
    LengthBucketBatchSampler,
    Seq2SeqCollator,
    Seq2SeqEncoder,
    SyntheticQA,
    Tokenizer,
    format_qa_prompt,
    qa_to_seq2seq,
    to_seq2seq,
)


@pytest.fixture(scope="module")
def task():
    return SyntheticQA(seed=0)


@pytest.fixture(scope="module")
def tok(task):
    return Tokenizer.train(task.corpus(task.generate(500)), vocab_size=300, num_sentinels=4,
                           model_type="bpe")


def test_qa_prompt_is_the_reference_format():
    assert format_qa_prompt("Who?", "Ann did.") == (
        "Answer the following question based only on the context.\n"
        "###Question\nWho?\n###Context\nAnn did.\n###Answer\n")
    assert QA_PROMPT.count("{") == 2


def test_qa_truncation_keeps_question(tok):
    enc = Seq2SeqEncoder(tok, max_source_len=40, max_target_len=8)
    question = "Where does Maria live?"
    context = " ".join(["Omar works as a baker."] * 30 + ["Maria lives in Lisbon."])
    ids = enc.qa_source_ids(question, context)
    assert len(ids) <= 40
    text = tok.decode(ids)
    assert question in text and text.rstrip().endswith("###Answer")
    assert "Lisbon" not in text  # the context's end was cut
    # short inputs are the plain prompt's ids
    assert enc.qa_source_ids(question, "Maria lives in Lisbon.") == tok.encode(
        format_qa_prompt(question, "Maria lives in Lisbon."))


def test_encoder_targets_end_with_eos(tok):
    enc = Seq2SeqEncoder(tok, max_source_len=16, max_target_len=3)
    ex = enc({"source": "Omar works as a baker in Lisbon and Paris", "target": "a baker in Paris"})
    assert len(ex["input_ids"]) <= 16
    assert len(ex["labels"]) == 3 and ex["labels"][-1] == tok.eos_id
    with pytest.raises(KeyError, match="target"):
        enc({"source": "x"})


def test_field_mapping():
    recs = [{"q": "Who?", "c": "Ann.", "a": {"text": ["Ann", "ann"]}}]
    assert qa_to_seq2seq(recs, question_field="q", context_field="c", answer_field="a") == [
        {"question": "Who?", "context": "Ann.", "target": "Ann"}]
    assert to_seq2seq([{"x": 1, "y": "b"}], source_field="x", target_field="y") == [
        {"source": "1", "target": "b"}]
    with pytest.raises(KeyError, match="'answer'"):
        qa_to_seq2seq([{"question": "q", "context": "c"}])


def test_collator_shifts_and_masks():
    coll = Seq2SeqCollator(pad_id=0, bos_id=1)
    batch = coll([{"input_ids": [5, 6, 7], "labels": [8, 9, 2]},
                  {"input_ids": [5], "labels": [10, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["decoder_input_ids"].tolist() == [[1, 8, 9], [1, 10, 0]]
    assert batch["labels"].tolist() == [[8, 9, 2], [10, 2, -100]]
    assert batch["decoder_attention_mask"].tolist() == [[True] * 3, [True, True, False]]
    with pytest.raises(ValueError, match="empty"):
        coll([])


def test_bucketing_covers_everything_and_is_deterministic():
    lengths = [(i * 37) % 101 + 1 for i in range(500)]
    sampler = LengthBucketBatchSampler(lengths, 16, seed=3, bucket_multiplier=8)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert len(batches) == len(sampler)
    assert batches == LengthBucketBatchSampler(lengths, 16, seed=3, bucket_multiplier=8).batches(0)
    assert batches != sampler.batches(1)
    # bucketed batches hold similar lengths: far less padding than random batches
    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    random_batches = LengthBucketBatchSampler(lengths, 16, seed=3, bucket_multiplier=1).batches(0)
    assert padding(batches) < 0.5 * padding(random_batches)
    assert len(LengthBucketBatchSampler(lengths, 16, drop_last=True, bucket_multiplier=8)) == sum(
        min(128, 500 - s) // 16 for s in range(0, 500, 128))


def _stream(examples, rank=0, world=1):
    sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in examples], 4, seed=1)
    return BatchStream(examples, sampler, Seq2SeqCollator(), rank=rank, world_size=world)


def test_stream_resumes_and_shards():
    examples = [{"input_ids": list(range(5, 6 + i % 9)), "labels": [7, 2]} for i in range(40)]
    full = _stream(examples)
    first = [next(full)["input_ids"] for _ in range(25)]  # crosses an epoch (10 batches each)
    resumed = _stream(examples)
    for _ in range(13):
        next(resumed)
    state = resumed.state_dict()
    again = _stream(examples)
    again.load_state_dict(state)
    assert all(torch.equal(next(again)["input_ids"], x) for x in first[13:])
    # two ranks together see the batches one process sees, interleaved
    r0, r1 = _stream(examples, 0, 2), _stream(examples, 1, 2)
    for k in range(5):
        assert torch.equal(next(r0)["input_ids"], first[2 * k])
        assert torch.equal(next(r1)["input_ids"], first[2 * k + 1])


def test_load_local_files(tmp_path):
    pytest.importorskip("datasets")
    from fastencdec.data import load_records

    rows = [{"question": "Who?", "context": "Ann.", "answer": "Ann"},
            {"question": "Where?", "context": "Rome.", "answer": "Rome"}]
    jl = tmp_path / "qa.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    csv = tmp_path / "qa.csv"
    csv.write_text("source,target\nhello,world\nfoo,bar\n")
    txt = tmp_path / "t.txt"
    txt.write_text("line one\nline two\n")
    cache = str(tmp_path / "cache")
    assert qa_to_seq2seq(load_records(jl, cache_dir=cache))[1]["target"] == "Rome"
    assert to_seq2seq(load_records(str(csv), cache_dir=cache))[0] == {"source": "hello",
                                                                      "target": "world"}
    assert load_records(txt, cache_dir=cache)[1] == {"text": "line two"}
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="format"):
        bad = tmp_path / "x.xml"
        bad.write_text("<a/>")
        load_records(bad)


def test_hub_name_offline_gives_clear_error(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    from fastencdec.data import DatasetUnavailableError, load_records

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnavailableError, match="offline and not in the datasets cache"):
        load_records("fastencdec-test/no-such-dataset", cache_dir=str(tmp_path))


def test_local_files_need_no_datasets_and_are_read_lazily(tmp_path, monkeypatch):
    import builtins
    import sys

    from fastencdec.data import load_records

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("datasets is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    rows = [{"question": f"q{i}", "context": "c" * i, "answer": str(i)} for i in range(50)]
    jl = tmp_path / "qa.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line at the end
    records = load_records(jl)
    assert len(records) == 50 and records[7] == rows[7] and records[-1] == rows[-1]
    assert list(records)[:2] == rows[:2]
    assert records.byte_length(3) == len(json.dumps(rows[3])) + 1
    arr = tmp_path / "qa.json"
    arr.write_text(json.dumps(rows[:3]))
    assert load_records(arr)[2] == rows[2]
    both = load_records([str(jl), str(jl)])
    assert len(both) == 100 and both[60] == rows[10]
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\n  \ntwo\n")
    assert list(load_records(txt)) == [{"text": "one"}, {"text": "two"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl: record 2 is not valid JSON"):
        load_records(bad)[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_records(empty)
    with pytest.raises(ImportError, match="datasets"):  # parquet still needs it
        pq = tmp_path / "x.parquet"
        pq.write_bytes(b"PAR1")
        load_records(pq)
    with pytest.raises(FileNotFoundError):  # looks like a file, not a hub name
        load_records("data/missing.jsonl")


def test_lazy_examples_are_encoded_on_demand(tok, task, tmp_path):
    from fastencdec.data import MappedSequence, approx_lengths, load_records, qa_record

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": e["question"], "context": e["context"],
                                          "answer": e["target"]}) for e in task.generate(20)))
    records = load_records(path)
    enc = Seq2SeqEncoder(tok, max_source_len=64, max_target_len=4)
    calls = []

    def encode(r):
        calls.append(r["question"])
        return enc(qa_record(r))

    examples = MappedSequence(records, encode)
    assert calls == [] and len(examples) == 20
    assert examples[3] == enc(qa_record(records[3])) and len(calls) == 1
    lengths = approx_lengths(records)
    assert lengths == [records.byte_length(i) for i in range(20)]


def test_text_blocks_cut_raw_text_into_chunks(tok, task):
    from fastencdec.data import InMemoryRecords, TextBlocks

    lines = [{"text": e["context"]} for e in task.generate(60, split="text")]
    blocks = TextBlocks(InMemoryRecords(lines), tok, 32, separator=tok.eos_id)
    full = [i for line in lines for i in tok.encode(line["text"]) + [tok.eos_id]]
    assert abs(len(blocks) - len(full) // 32) <= 0.2 * len(full) / 32  # about the whole text
    assert blocks.lengths() == [32] * len(blocks)
    text = " " + " ".join(map(str, full)) + " "
    covered = set()
    for b in range(len(blocks)):
        ids = blocks[b]["input_ids"]
        assert 1 <= len(ids) <= 32
        piece = " " + " ".join(map(str, ids)) + " "
        assert piece in text  # consecutive tokens of the text
        first = text[:text.index(piece) + 1].count(" ") - 1
        covered.update(range(first, first + len(ids)))
    assert len(covered) >= 0.8 * len(full)
    with pytest.raises(ValueError, match="no text"):
        TextBlocks(InMemoryRecords([]), tok, 32)
