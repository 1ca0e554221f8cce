"""tools/preprocess_data.py: megatron-core's IndexedDataset reads back exactly the tokenizer's ids,
and the output is byte-identical on 1 worker, 2 workers and a local Ray runtime."""

import json
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_qwen.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "multilingual.jsonl"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def preprocess(*argv):
    runpy.run_path(str(REPO / "tools" / "preprocess_data.py"), run_name="tool")["main"](
        [*map(str, argv), "--no-progress"])


def records():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


DOCS_TEXT = [r["text"] for r in records()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("single") / "ml"
    preprocess("--input", DATA, "--output-prefix", prefix, "--append-eod", "--json-keys", "text", "id",
               "--chunk-bytes", 4000)
    return prefix


def test_indexed_dataset_holds_the_tokenizer_ids_plus_eod(single):
    tok = load_tokenizer()
    docs = records()
    for key in ("text", "id"):
        ds = IndexedDataset(f"{single}_{key}_document")
        assert len(ds) == len(docs) and ds.index.dtype == np.int32
        assert list(ds.document_indices) == list(range(len(docs) + 1))
        for i, doc in enumerate(docs):
            assert ds[i].tolist() == tok.encode(doc[key]) + [tok.eod_id], (key, doc["id"])



def test_files_equal_megatron_cores_builder_one_document_at_a_time(single, tmp_path):
    # the tool writes a chunk at a time; the bytes must be what add_document per document gives
    tok = load_tokenizer()
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(f"{ref}.bin", dtype=np.int32)
    for doc in records():
        builder.add_document(np.array(tok.encode(doc["text"]) + [tok.eod_id]), [len(tok.encode(doc["text"])) + 1])
    builder.finalize(f"{ref}.idx")
    for ext in (".bin", ".idx"):
        assert Path(f"{single}_text_document{ext}").read_bytes() == Path(ref + ext).read_bytes(), ext


def test_special_token_strings_are_text(single):
    tok = load_tokenizer()
    docs = records()
    # the literal "<|endoftext|>" in a document is text, not the EOD id
    ds = IndexedDataset(f"{single}_text_document")
    special = next(i for i, d in enumerate(docs) if d["id"] == "special-0")
    assert ds[special].tolist().count(tok.eod_id) == 1


def test_without_append_eod_documents_are_bare(tmp_path):
    tok = load_tokenizer()
    preprocess("--input", DATA, "--output-prefix", tmp_path / "bare")
    ds = IndexedDataset(str(tmp_path / "bare_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(d["text"]) for d in records()]
    assert not (tmp_path / "bare_id_document.bin").exists()


def test_workers_and_ray_give_identical_files(single, tmp_path):
    import ray

    from megatron_qwen.data.corpus.jsonl import CorpusError

    many = tmp_path / "many.jsonl"
    many.write_text(DATA.read_text() * 4)  # several chunks per worker
    runs = {"w1": ["--workers", 1], "w2": ["--workers", 2], "ray": ["--ray", "local", "--workers", 2]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one runtime for both Ray jobs
    try:
        for name, flags in runs.items():
            preprocess("--input", many, "--output-prefix", tmp_path / name, "--append-eod",
                       "--chunk-bytes", 5000, *flags)
        # --strict on Ray: a bad line in a remote task is the same one-line error
        bad = tmp_path / "bad.jsonl"
        bad.write_text(DATA.read_text() + "{oops\n")
        with pytest.raises(CorpusError, match=rf"^{bad}:{len(DATA.read_text().splitlines()) + 1}: not valid JSON"):
            preprocess("--input", bad, "--output-prefix", tmp_path / "strict", "--ray", "local", "--strict")
    finally:
        ray.shutdown()
    assert not list(tmp_path.glob("strict*"))
    # --strict on local workers too, after the shards of earlier chunks were written: no output,
    # no shard directory left behind
    with pytest.raises(CorpusError, match=rf"^{bad}:"):
        preprocess("--input", bad, "--output-prefix", tmp_path / "strict2", "--workers", 2,
                   "--chunk-bytes", 5000, "--strict")
    assert not list(tmp_path.glob("strict2*")) and not list(tmp_path.glob("*.shards"))
    files = {name: [(tmp_path / f"{name}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
             for name in runs}
    assert files["w1"] == files["w2"] == files["ray"]
    ds = IndexedDataset(str(tmp_path / "ray_text_document"))
    ref = IndexedDataset(f"{single}_text_document")
    assert len(ds) == 4 * len(ref)
    assert all(np.array_equal(ds[i], ref[i % len(ref)]) for i in range(len(ds)))


def test_bad_lines_are_skipped_for_every_key_and_counted(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"text": "kept one", "id": "a"}\n{"text": "no id here"}\nnot json\n'
                   '{"text": "kept two", "id": "b"}\n')
    summary = tmp_path / "summary.json"
    preprocess("--input", src, "--output-prefix", tmp_path / "m", "--json-keys", "text", "id",
               "--summary", summary)
    text, ids = (IndexedDataset(str(tmp_path / f"m_{k}_document")) for k in ("text", "id"))
    tok = load_tokenizer()
    assert [text[i].tolist() for i in range(len(text))] == [tok.encode("kept one"), tok.encode("kept two")]
    assert len(ids) == 2
    s = json.loads(summary.read_text())
    assert s["skipped"] == {"missing_field": 1, "malformed_json": 1}
    assert s["skipped_at"]["missing_field"] == [f"{src}:2: required field missing (no 'id')"]
    assert s["tokens"] == sum(len(tok.encode(t)) for t in ("kept one", "kept two", "a", "b"))


def test_long_documents_take_the_tokenizers_chunked_path(tmp_path):
    import inspect
    import json as json_module

    text = inspect.getsource(json_module.decoder) * 3 + "\n".join(DOCS_TEXT)  # > 32k characters
    assert len(text) > 32_768
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    preprocess("--input", src, "--output-prefix", tmp_path / "long", "--append-eod")
    tok = load_tokenizer()
    ds = IndexedDataset(str(tmp_path / "long_text_document"))
    assert ds[0].tolist() == tok.encode(text) + [tok.eod_id]
    assert ds[1].tolist() == tok.encode("short") + [tok.eod_id]


def test_a_small_vocabulary_gets_uint16_ids(tmp_path):
    # docs/data.md: ids take megatron-core's optimal dtype (uint16 under 65,500 ids, else int32)
    from megatron_qwen.tokenizer import write_tiktoken_ranks

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"th": 256, b"the": 257, b" the": 258})
    vocab = tmp_path / "small.tiktoken"
    write_tiktoken_ranks(ranks, vocab)
    tok = load_tokenizer(vocab)
    assert tok.vocab_size < 65_500
    preprocess("--input", DATA, "--output-prefix", tmp_path / "small", "--tokenizer-path", vocab, "--append-eod")
    ds = IndexedDataset(str(tmp_path / "small_text_document"))
    assert ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod_id] for t in DOCS_TEXT]


def _stream_index(path, lengths: np.ndarray, chunk: int) -> int:
    """Write a dataset of ``lengths`` (token ids = positions) chunk by chunk; -> traced peak bytes."""
    import tracemalloc

    from megatron_qwen.data.corpus import indexed

    builder = indexed._chunk_builder_class()(f"{path}.bin", dtype=np.int32)
    tracemalloc.start()
    try:
        for lo in range(0, len(lengths), chunk):
            part = lengths[lo : lo + chunk]
            builder.add_documents(np.arange(int(part.sum()), dtype=np.int32), part)
        builder.finalize(f"{path}.idx")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_index_streams_and_is_megatron_cores(tmp_path, monkeypatch):
    """The .idx is written from a side file in blocks (several here): the bytes of megatron-core's
    own builder on the same documents, and peak memory flat at 4x the documents (megatron-core's
    builder holds two Python lists, ~70 bytes a document: 2 GB at 31M documents)."""
    from megatron_qwen.data.corpus import indexed

    monkeypatch.setattr(indexed, "_INDEX_BLOCK", 7000, raising=False)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 120_000).astype(np.int64)
    small = _stream_index(tmp_path / "small", lengths[:30_000], 5000)
    big = _stream_index(tmp_path / "big", lengths, 5000)
    assert big < 1.2 * small, (small, big)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for lo in range(0, len(lengths), 5000):
        part = lengths[lo : lo + 5000]
        ref.data_file.write(np.arange(int(part.sum()), dtype=np.int32).tobytes())
    ref.sequence_lengths = lengths.tolist()
    ref.document_indices = list(range(len(lengths) + 1))
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"big{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    assert not list(tmp_path.glob("*.lengths"))
    ds = IndexedDataset(str(tmp_path / "big"))
    assert len(ds) == len(lengths) and ds[119_999].size == lengths[-1]
