"""The Qwen tokenizer against dashscope's QwenTokenizer (the reference implementation)."""

import unicodedata

import numpy as np
import pytest
from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer as ReferenceTokenizer

from megatron_qwen.tokenizer import TokenizerError, load_tokenizer, read_tiktoken_ranks
from megatron_qwen.tokenizer.qwen import MAX_CHUNK_CHARS

MULTILINGUAL = (
    "Hello, world! It's 2024; we'll ship v1.2.3 on 3/14 at 09:30. DON'T PANIC.\n"
    "通义千问是阿里巴巴开发的大语言模型，它支持中文和英文。我们今天学习了123个新词！\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
    "\tTabs\tand   three spaces,      six spaces, trailing   \n\n\n"
    "emoji 😀🚀👍🏽 and ZWJ 👨‍👩‍👧; accents café naïve Ångström; Ελληνικά; русский; العربية; 日本語です。\n"
    "numbers 3.14159 1,000,000 ٣٤٥ ½ Ⅻ\r\n"
    "special strings: <|endoftext|> <|im_start|>user\nhi<|im_end|> <|extra_0|><|extra_204|>\n"
    "decomposed e\u0301 and u\u0308 are NFC-normalised   "
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ref(tok):
    return ReferenceTokenizer(str(tok.vocab_file))


def test_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 151851 and tok.num_ranks == 151643
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.special_tokens["<|extra_204|>"] == 151850
    # what megatron-core's GPTDataset and inference code read
    assert tok.eod == tok.pad == 151643 and tok.vocab_size == 151851
    assert tok.detokenize(tok.tokenize("a b")) == "a b"


def test_ids_match_dashscope_with_specials_as_text(tok, ref):
    # dashscope allows specials by default; with none allowed it treats them as text, like us
    expected = ref.encode(MULTILINGUAL, allowed_special=set(), disallowed_special=())
    ours = tok.encode(MULTILINGUAL)
    assert ours == expected
    assert 151645 not in ours and 151643 not in ours  # <|im_end|> cannot be injected via data
    assert tok.decode(ours) == unicodedata.normalize("NFC", MULTILINGUAL)


def test_ids_match_dashscope_with_specials_allowed(tok, ref):
    ours = tok.encode(MULTILINGUAL, allow_special=True)
    assert ours == ref.encode(MULTILINGUAL)
    assert ours.count(tok.im_end_id) == 1 and ours.count(tok.special_tokens["<|extra_204|>"]) == 1


def test_digits_are_split_one_by_one(tok):
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_batch_encode_matches_single(tok, ref):
    texts = MULTILINGUAL.splitlines() + ["", "x" * (MAX_CHUNK_CHARS + 5)]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:3]) == [ref.encode(t, allowed_special=set()) for t in texts[:3]]


def test_multi_megabyte_input_is_cut_without_changing_ids(tok):
    # ~2 MB with long runs: letters and newlines with no safe cut inside them.
    body = MULTILINGUAL.replace("<|", "< |") * 3000
    text = body[: len(body) // 2] + "a" * 300_000 + "\n" * 100_000 + "词" * 20_000 + body[len(body) // 2 :]
    assert len(text.encode()) > 2_000_000
    ours = tok.encode(text)
    assert ours == tok._encoding.encode_ordinary(unicodedata.normalize("NFC", text))


def test_megabyte_whitespace_run_does_not_overflow(tok):
    # tiktoken's own regex overflows its stack on this input
    text = "x" + " " * 1_000_000 + "y\n" + "end"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    run = tok._encoding._encode_single_piece(b" " * 999_999)  # pieces: 'x', 999,999 spaces, ' y', ...
    assert ids == tok.encode("x") + run + tok.encode(" y\nend")


def test_encode_array_equals_encode_and_dashscope(tok, ref):
    # the bulk path of preprocess_data.py: short and chunked texts, a whitespace run that only
    # the piece-by-piece path survives, decomposed (NFD) text and a lone surrogate
    body = MULTILINGUAL.replace("<|", "< |")
    texts = MULTILINGUAL.splitlines() + [
        "", MULTILINGUAL, body * 40, "x" + " " * 200_000 + "y\nend",
        unicodedata.normalize("NFD", "Crème brûlée, São Paulo, 한국어"), "bad \ud800 surrogate",
    ]
    for text in texts:
        array = tok.encode_array(text)
        assert array.dtype == np.int32
        assert array.tolist() == tok.encode(text), text[:40]
    for text in texts[:-1]:  # dashscope rejects the lone surrogate outright
        if len(text) < 100_000:
            assert tok.encode_array(text).tolist() == ref.encode(text, allowed_special=set(), disallowed_special=())


def test_vocabulary_sources(tmp_path, tok):
    # an HF model directory with qwen.tiktoken, an explicit file, and clear errors
    (tmp_path / "qwen.tiktoken").write_bytes(tok.vocab_file.read_bytes())
    assert load_tokenizer(tmp_path).encode("你好") == tok.encode("你好")
    assert load_tokenizer(tmp_path / "qwen.tiktoken").vocab_size == 151851
    with pytest.raises(TokenizerError, match="has no qwen.tiktoken"):
        load_tokenizer(tmp_path / "..")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: bad token or rank"):
        read_tiktoken_ranks(bad)
    bad.write_text("IQ== 0\nIg== 0\n")
    with pytest.raises(TokenizerError, match=r":2: rank 0"):
        read_tiktoken_ranks(bad)


def test_megatron_core_dataset_takes_the_tokenizer_directly(tok):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=16, tokenizer=tok, reset_position_ids=True,
                           reset_attention_mask=True, eod_mask_loss=True, split="1,0,0")
    train = BlendedMegatronDatasetBuilder(MockGPTDataset, [4, None, None], lambda: True, cfg).build()[0]
    sample = train[0]
    assert sample["tokens"].shape == (16,) and cfg.token_dtype_code == 4  # int32 ids: vocab > 65536
    assert tok.vocab_sha256 in train.unique_description
