"""data/: shard format round trip, corruption reports, local tokenisation, download helper."""

import numpy as np
import pytest

from data.fineweb import HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, check_shard_header, read_shard, write_shard


def _write_raw(path, header_values, num_token_bytes):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[: len(header_values)] = header_values
    path.write_bytes(header.tobytes() + bytes(num_token_bytes))
    return path


# ---- Shard format ----

def test_shard_round_trip(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 464, 3290], dtype=np.int64)
    path = tmp_path / "shard.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [MAGIC, VERSION, len(tokens)] and not header[3:].any()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)
    assert check_shard_header(path) == len(tokens)


def test_empty_shard_round_trip(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_shard(tmp_path / "e.bin").size == 0


def test_write_rejects_tokens_outside_uint16(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "bad.bin", [1, 70000])
    with pytest.raises(ValueError, match="must be integers"):
        write_shard(tmp_path / "bad.bin", [1.5, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "bad.bin", [[1, 2]])


@pytest.mark.parametrize("header, token_bytes, message", [
    ([123, VERSION, 4], 8, "wrong magic number 123"),
    ([MAGIC, 7, 4], 8, "unsupported shard version 7"),
    ([MAGIC, VERSION, 5], 8, "header says 5 tokens"),  # truncated
    ([MAGIC, VERSION, 3], 8, "header says 3 tokens"),  # trailing bytes
])
def test_corrupt_shard_is_reported_by_name(tmp_path, header, token_bytes, message):
    path = _write_raw(tmp_path / "fineweb_train_000001.bin", header, token_bytes)
    for reader in (read_shard, check_shard_header):
        with pytest.raises(ValueError, match=message) as info:
            reader(path)
        assert "fineweb_train_000001.bin" in str(info.value)


def test_file_shorter_than_header_is_reported(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="short.bin.*shorter than the 1024-byte header"):
        read_shard(path)


def test_missing_shard_is_reported(tmp_path):
    with pytest.raises(ValueError, match="missing.bin: cannot read shard"):
        read_shard(tmp_path / "missing.bin")


# ---- Tokenisation (real GPT-2 encoding) ----

DOCUMENTS = ["Hello world.", "The quick brown fox jumps over the lazy dog. " * 5,
             "Unicode: naïve café, 東京, emoji 🙂.", "<|endoftext|> is plain text inside a document.",
             "Last one.\n\nWith a blank line."]


@pytest.fixture
def gpt2():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def _write_jsonl(path, texts):
    import json
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_tokenise_local_jsonl_into_shards(tmp_path, gpt2):
    from data.fineweb import EOT_TOKEN, main
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    (tmp_path / "extra.txt").write_text("A text file.\n\nIs one document.", encoding="utf-8")
    out = tmp_path / "shards"
    main(["--input", str(tmp_path / "docs.jsonl"), str(tmp_path / "extra.txt"), "--out", str(out),
          "--val_tokens", "20", "--shard_tokens", "30", "--workers", "2"])

    texts = DOCUMENTS + ["A text file.\n\nIs one document."]
    expected = np.concatenate([[EOT_TOKEN] + gpt2.encode_ordinary(t) for t in texts])
    names = sorted((p.name for p in out.iterdir()), key=lambda name: name[-10:])  # by index: val first
    num_train = -(-(len(expected) - 20) // 30)
    assert names == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]
    shards = [read_shard(out / "fineweb_val_000000.bin")] + [read_shard(out / n) for n in names[1:]]
    assert [len(s) for s in shards] == [20] + [30] * (num_train - 1) + [len(expected) - 20 - 30 * (num_train - 1)]
    stream = np.concatenate(shards)
    np.testing.assert_array_equal(stream, expected)
    # Split the stream at the separators: every document comes back, each starting with 50256.
    starts = np.flatnonzero(stream == EOT_TOKEN)
    assert len(starts) == len(texts) and starts[0] == 0
    decoded = [gpt2.decode(doc[1:].tolist()) for doc in np.split(stream, starts[1:])]
    assert decoded == texts


def test_max_train_shards_stops_early(tmp_path):
    from data.fineweb import tokenize_to_shards
    written = tokenize_to_shards(DOCUMENTS * 4, tmp_path, val_tokens=10, shard_tokens=10, max_train_shards=2,
                                 workers=1)
    assert [p.name for p in written] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                         "fineweb_train_000002.bin"]
    assert all(len(read_shard(p)) == 10 for p in written)


def test_refuses_to_mix_with_existing_shards(tmp_path):
    from data.fineweb import tokenize_to_shards
    write_shard(tmp_path / "fineweb_train_000007.bin", [1, 2])
    with pytest.raises(ValueError, match="already holds shards \\(fineweb_train_000007.bin"):
        tokenize_to_shards(DOCUMENTS, tmp_path, val_tokens=10, shard_tokens=10, workers=1)


def test_hub_input_streams_fineweb_sample_10bt(tmp_path, monkeypatch):
    """The default input (no network here): the documents of a streamed FineWeb sample-10BT."""
    import sys
    import types
    from data.fineweb import EOT_TOKEN, main
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter([{"text": text, "id": str(i)} for i, text in enumerate(DOCUMENTS)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    main(["--out", str(tmp_path), "--val_tokens", "5", "--shard_tokens", "1000", "--workers", "1"])
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT", "train", True)]
    stream = np.concatenate([read_shard(tmp_path / "fineweb_val_000000.bin"),
                             read_shard(tmp_path / "fineweb_train_000001.bin")])
    assert (stream == EOT_TOKEN).sum() == len(DOCUMENTS)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    from data.fineweb import main
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:3: expected a JSON object with a string field \"text\""):
        main(["--input", str(path), "--out", str(tmp_path / "o"), "--workers", "1"])
    path.write_text('{"text": "fine"}\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: malformed JSON"):
        main(["--input", str(path), "--out", str(tmp_path / "o"), "--workers", "1"])


def test_input_too_small_for_a_train_shard(tmp_path):
    from data.fineweb import main
    _write_jsonl(tmp_path / "small.jsonl", ["tiny"])
    with pytest.raises(SystemExit, match="only 2 tokens.*no training shard"):
        main(["--input", str(tmp_path / "small.jsonl"), "--out", str(tmp_path / "o"), "--val_tokens", "100",
              "--workers", "1"])


# ---- Download helper (the hub client is replaced by a fake: no network here) ----

@pytest.fixture
def cached(monkeypatch):
    import data.cached_fineweb10B as cached
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir, force_download):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        calls.append((filename, force_download))
        write_shard(f"{local_dir}/{filename}", np.arange(8))

    monkeypatch.setattr(cached, "hf_hub_download", fake_download)
    cached.calls = calls
    return cached


def test_download_fetches_val_and_first_train_shards_then_skips_them(cached, tmp_path):
    from pathlib import Path
    assert cached.DATA_DIR == Path(__file__).resolve().parents[1] / "data" / "fineweb10B"
    assert cached.download_shards(2, tmp_path) == 3
    assert cached.calls == [("fineweb_val_000000.bin", False), ("fineweb_train_000001.bin", False),
                            ("fineweb_train_000002.bin", False)]
    assert cached.download_shards(2, tmp_path) == 0 and len(cached.calls) == 3
    # A truncated shard is not trusted: it is fetched again, forcing past the hub client's own cache.
    path = tmp_path / "fineweb_train_000002.bin"
    path.write_bytes(path.read_bytes()[:-2])
    assert cached.download_shards(2, tmp_path) == 1
    assert cached.calls[-1] == ("fineweb_train_000002.bin", True)


def test_failed_download_names_file_and_cause(cached, tmp_path, monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(cached, "hf_hub_download", offline)
    with pytest.raises(SystemExit, match="downloading fineweb_val_000000.bin .*ConnectionError: Name or service"):
        cached.download_shards(1, tmp_path)


def test_downloaded_garbage_is_an_error(cached, tmp_path, monkeypatch):
    monkeypatch.setattr(cached, "hf_hub_download", lambda local_dir, filename, **kw:
                        open(f"{local_dir}/{filename}", "wb").write(b"<html>rate limited</html>"))
    with pytest.raises(SystemExit, match="fineweb_val_000000.bin but it is not a valid shard.*shorter than"):
        cached.download_shards(0, tmp_path)


def test_download_rejects_impossible_shard_count(cached, tmp_path):
    with pytest.raises(SystemExit, match="between 0 and 103"):
        cached.download_shards(104, tmp_path)
