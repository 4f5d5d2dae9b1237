"""Tokenizer: special ids, sentinels, batch encode/decode with padding, save/load."""

import pytest
import torch

from fastencdec.data import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Maria lives in Lisbon. Omar works as a baker.",
    "Answer the following question based only on the context.",
    "where does the lazy dog live? in a small house near the river",
] * 50


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=200, num_sentinels=8, model_type="bpe")


def test_special_ids_and_sentinels(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.sentinel_ids == list(range(4, 12))
    assert tok.sp.id_to_piece(tok.sentinel_ids[3]) == "<extra_id_3>"
    assert tok.vocab_size <= 200


def test_encode_decode_roundtrip(tok):
    text = "the lazy dog lives in Lisbon"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    with_specials = tok.encode(text, add_bos=True, add_eos=True)
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert tok.decode(with_specials) == text
    # stop at EOS: what follows is not text
    assert tok.decode(ids + [tok.eos_id] + ids) == text


def test_batch_encode_pads_right_with_masks(tok):
    texts = ["the dog", "the quick brown fox jumps"]
    batch = tok(texts, add_eos=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    lengths = [len(tok.encode(t)) + 1 for t in texts]
    assert ids.shape == (2, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[~mask] == tok.pad_id).all()
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0]:].any()
    assert tok.batch_decode(ids) == texts


def test_left_padding_truncation_and_max_length(tok):
    batch = tok(["the dog", "the quick brown fox jumps over"], add_eos=True, max_length=4,
                padding="max_length", padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 4)
    assert ids[1, -1] == tok.eos_id  # truncation keeps the EOS
    n0 = len(tok.encode("the dog")) + 1
    assert mask[0].tolist() == [False] * (4 - n0) + [True] * n0


def test_save_load_same_ids(tok, tmp_path):
    path = tok.save(tmp_path)
    again = Tokenizer.load(path)
    assert Tokenizer.load(tmp_path).vocab_size == tok.vocab_size
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    assert again.sentinel_ids == tok.sentinel_ids


def test_train_from_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(CORPUS))
    tok = Tokenizer.train(files=[f], vocab_size=120, num_sentinels=2, model_type="bpe")
    assert tok.sentinel_ids == [4, 5]
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"


def test_errors_name_the_argument(tok):
    with pytest.raises(ValueError, match="texts"):
        Tokenizer.train()
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=10, num_sentinels=8)
    with pytest.raises(FileNotFoundError):
        Tokenizer.train(files=["/nonexistent/corpus.txt"])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="padding"):
        tok(["a"], padding="max_length")


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"\x00\x01garbage" * 20, "is not a valid sentencepiece model"),
    (b"\n\x05hello", "is not a valid sentencepiece model"),
])
def test_broken_tokenizer_files_name_the_file(tmp_path, content, needle):
    from fastencdec.data import load_tokenizer

    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    for load in (Tokenizer.load, load_tokenizer):
        with pytest.raises(ValueError, match=needle) as info:
            load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_broken_tokenizer_json_names_the_file(tmp_path):
    pytest.importorskip("tokenizers")
    from fastencdec.data import load_tokenizer

    path = tmp_path / "tokenizer.json"
    for content, needle in ((b"", "is empty"), (b'{"model": 5}', "not a valid tokenizer.json")):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=needle) as info:
            load_tokenizer(path)
        assert str(path) in str(info.value)


def test_tokenizer_json_works_like_a_sentencepiece_one(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from fastencdec.data import JsonTokenizer, load_tokenizer

    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "<|endoftext|>", "<extra_id_0>", "<extra_id_1>"]
    tk.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(vocab_size=120,
                                                                  special_tokens=specials))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, JsonTokenizer)
    # guessed names: [PAD] pads, <|endoftext|> ends, and (no BOS) the pad id starts
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 2, 0, 1)
    assert tok.sentinel_ids == [3, 4]
    ids = tok.encode("the lazy dog", add_eos=True)
    assert ids[-1] == tok.eos_id and tok.decode(ids) == "the lazy dog"
    batch = tok(["the dog", "the quick brown fox"])
    assert batch["attention_mask"].sum(1).tolist() == [len(tok.encode("the dog")),
                                                       len(tok.encode("the quick brown fox"))]
    saved = tok.save(tmp_path / "copy.json")
    again = load_tokenizer(saved)
    assert again.pieces() == tok.pieces() and again.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        bare = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
        bare.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(vocab_size=60))
        JsonTokenizer(bare)
