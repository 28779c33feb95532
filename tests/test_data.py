"""data/: shard format round trip, corruption reports, local tokenisation, download helper."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_tests_find_the_shared_tiktoken_cache_beside_or_inside_the_checkout(tmp_path):
    """The tokenisation tests load the GPT-2 encoding, which needs a network or tiktoken's cache: on the GPU
    machine only the checkout travels, with the cache copied into its shared/."""
    from conftest import shared_folder
    repo = tmp_path / "repo"
    inside, beside = repo / "shared" / "tiktoken_cache", tmp_path / "shared" / "tiktoken_cache"
    inside.mkdir(parents=True)
    assert shared_folder(repo, "tiktoken_cache") is None  # an empty folder holds no encoding
    (inside / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").write_text("vocab")
    assert shared_folder(repo, "tiktoken_cache") == inside
    beside.mkdir(parents=True)
    (beside / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").write_text("vocab")
    assert shared_folder(repo, "tiktoken_cache") == beside

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


def test_a_folder_input_is_its_txt_and_jsonl_files_with_subfolders_in_sorted_order(tmp_path):
    from data.fineweb import list_local_files
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.txt", "sub/c.txt", "a.jsonl", "notes.md"):
        (folder / name).write_text("text")
    found = list_local_files([str(folder)])
    assert [path.relative_to(folder).as_posix() for path in found] == ["a.jsonl", "b.txt", "sub/c.txt"]


OFFLINE_TOKENISE = """
import sys
import tiktoken.load

def offline(blobpath):
    raise ConnectionError(f"no network for {blobpath}")

tiktoken.load.read_file = offline  # the download path fails as it does on a machine without a network
sys.path.insert(0, "data")
import fineweb
fineweb.main(sys.argv[1:])
"""


def test_missing_gpt2_encoding_fails_once_with_a_clear_message(tmp_path):
    """No network and an empty tiktoken cache: one error before any worker starts, not a pool respawning
    failing workers forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    (tmp_path / "empty_cache").mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"))
    result = subprocess.run([sys.executable, "-c", OFFLINE_TOKENISE, "--input", str(tmp_path / "docs.jsonl"),
                             "--out", str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr
    assert "error: cannot load the GPT-2 encoding (ConnectionError: no network for https://" in result.stderr
    assert "TIKTOKEN_CACHE_DIR" in result.stderr  # the fix: a cache that holds the encoding
    assert not (tmp_path / "out").exists()


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


def test_unreachable_hub_is_one_error_that_points_to_input(tmp_path, capsys, monkeypatch):
    """No network (the hub client is replaced by one that fails as it does offline): one error, before any work,
    with the cause and the way out (local text with --input), not a traceback."""
    import sys
    import types
    from data.fineweb import main

    def load_dataset(path, name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectionError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert_user_error(capsys, main, ["--out", str(tmp_path / "o"), "--workers", "1"],
                      r"error: cannot download HuggingFaceFW/fineweb \(sample-10BT\) from the Hugging Face hub "
                      r"\(ConnectionError: Couldn't reach 'HuggingFaceFW/fineweb' on the Hub .*"
                      r"tokenise local .txt/.jsonl text with --input")
    assert not any(tmp_path.iterdir())


def assert_user_error(capsys, main, argv, message):
    """main(argv) ends with exit code 2 and one error message (matching the regex `message`), no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    from data.fineweb import main
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\n', encoding="utf-8")
    assert_user_error(capsys, main, ["--input", str(path), "--out", str(tmp_path / "o"), "--workers", "1"],
                      r"bad.jsonl:3: expected a JSON object with a string field \"text\"")
    path.write_text('{"text": "fine"}\n{"text": "unterminated}\n', encoding="utf-8")
    assert_user_error(capsys, main, ["--input", str(path), "--out", str(tmp_path / "o"), "--workers", "1"],
                      r"bad.jsonl:2: malformed JSON")


def test_input_too_small_for_a_train_shard(tmp_path, capsys):
    from data.fineweb import main
    _write_jsonl(tmp_path / "small.jsonl", ["tiny"])
    (tmp_path / "o").mkdir()
    argv = ["--input", str(tmp_path / "small.jsonl"), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert_user_error(capsys, main, argv + ["--val_tokens", "100"], "only 2 tokens.*no training shard")
    # The failed run leaves no partial set (nor its .partial folder), so a rerun is not refused.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "small.jsonl"] and not any((tmp_path / "o").iterdir())
    main(argv + ["--val_tokens", "1"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]


def test_out_that_is_a_file_is_one_error(tmp_path, capsys):
    from data.fineweb import main
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    (tmp_path / "a_file").write_text("keep")
    assert_user_error(capsys, main, ["--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "a_file"),
                                     "--val_tokens", "5", "--shard_tokens", "1000", "--workers", "1"],
                      "--out .*a_file is a file, not a folder: choose a folder")
    assert (tmp_path / "a_file").read_text() == "keep"


def test_repeated_option_is_one_error(tmp_path, capsys):
    from data.fineweb import main
    docs = str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS))
    argv = ["--input", docs, "--out", str(tmp_path / "o"), "--shard_tokens", "1000", "--workers", "1"]
    for repeated, message in [(["--val_tokens", "5", "--val_tokens", "10"], "argument --val_tokens: given twice"),
                              (["--val_tokens", "5", "--val-tokens", "10"], "argument --val_tokens: given twice"),
                              (["--val_tokens", "5", "--input=" + docs], "argument --input: given twice"),
                              (["--val_tokens", "5", "--out", str(tmp_path / "p")], "argument --out: given twice"),
                              (["--val_tok", "5"], "unrecognized arguments: --val_tok")]:  # no abbreviation
        assert_user_error(capsys, main, argv + repeated, re.escape(message))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_options_take_both_spellings(tmp_path):
    from data.fineweb import main
    docs = str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS))
    main(["--input", docs, "--out", str(tmp_path / "o"), "--val-tokens", "5", "--shard-tokens", "1000",
          "--max-train-shards", "1", "--workers", "1"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `timeout` and `kill`
def test_an_interrupted_run_leaves_no_partial_folder_and_prints_one_line(tmp_path, sig):
    """The input is a pipe that this test feeds: the run is surely tokenising (its partial folder there) when the
    signal comes, however fast the machine."""
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    script = Path(__file__).resolve().parents[1] / "data" / "fineweb.py"
    process = subprocess.Popen([sys.executable, str(script), "--input", str(fifo), "--out", str(tmp_path / "o"),
                                "--val_tokens", "5", "--shard_tokens", "100", "--workers", "2"],
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    with open(fifo, "w") as feed:  # opens once the run reads it: after it made its partial folder and its pool
        feed.write("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS * 20))
        feed.flush()
        assert list(tmp_path.glob("o.partial*"))
        if sig == signal.SIGINT:  # Ctrl-C: the terminal's whole process group, the tokenisers too
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        time.sleep(0.5)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:  # a run that hangs is not left behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == f"fineweb.py: interrupted: no shards were written to {tmp_path}/o"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
    time.sleep(0.5)  # its tokenisers die with it (forked: their command line is the run's)
    assert not [pid for pid in Path("/proc").glob("[0-9]*") if f"{tmp_path}/o".encode() in _cmdline(pid)]


def _cmdline(pid):
    try:
        return (pid / "cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def test_workers_below_one_is_an_error_naming_the_flag(tmp_path, capsys):
    from data.fineweb import main
    docs = str(_write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS))
    for workers in ("0", "-1"):  # 0 used all cores silently, -1 was multiprocessing's error without the flag
        assert_user_error(capsys, main, ["--input", docs, "--out", str(tmp_path / "o"), "--workers", workers],
                          rf"--workers must be at least 1, got {workers} \(leave it out to use all \d+ cores\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


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


def test_a_file_where_the_shards_go_is_one_error(cached, tmp_path):
    (tmp_path / "fineweb10B").write_text("")
    with pytest.raises(SystemExit, match=f"^error: {tmp_path}/fineweb10B is a file, not a folder: move or delete"):
        cached.download_shards(1, tmp_path / "fineweb10B")
    assert cached.calls == []


def test_download_rejects_impossible_shard_count(cached, tmp_path):
    with pytest.raises(SystemExit, match="between 0 and 103"):
        cached.download_shards(104, tmp_path)
    assert cached.download_shards(103, tmp_path) == 104  # the whole set (val + 103 train shards) can be asked for


def test_download_command_fetches_30_train_shards_by_default(cached, monkeypatch, capsys):
    """30 x 100M tokens cover the record's 5690 steps of 524288 tokens (2.98B)."""
    asked = []
    monkeypatch.setattr(cached, "download_shards", asked.append)
    cached.main([])
    cached.main(["103"])
    assert asked == [30, 103]
    assert_user_error(capsys, cached.main, ["--he"], "unrecognized arguments: --he")  # no abbreviation of --help
    assert asked == [30, 103]


# ---- Synthetic shards (data/synthetic.py) ----

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from data.synthetic import write_synthetic_shards
    out = tmp_path_factory.mktemp("synthetic")
    written = write_synthetic_shards(out, train_tokens=2_500_000, val_tokens=400_000, shard_tokens=1_000_000, seed=3)
    return out, written


def test_synthetic_shards_are_valid_fineweb_format_shards(synthetic):
    from data.fineweb import EOT_TOKEN
    out, written = synthetic
    names = ["synthetic_val_000000.bin"] + [f"synthetic_train_{i:06d}.bin" for i in (1, 2, 3)]
    assert [p.name for p in written] == names and sorted(p.name for p in out.iterdir()) == sorted(names)
    shards = [read_shard(p) for p in written]
    assert [len(s) for s in shards] == [400_000, 1_000_000, 1_000_000, 500_000]
    assert [check_shard_header(p) for p in written] == [400_000, 1_000_000, 1_000_000, 500_000]
    for stream in (shards[0], np.concatenate(shards[1:])):
        assert stream.max() < 50257  # the GPT-2 vocabulary, not just uint16
        starts = np.flatnonzero(stream == EOT_TOKEN)
        assert starts[0] == 0  # every stream opens a document
        lengths = np.diff(starts)
        assert lengths.min() >= 2  # the separator is followed by content, never doubled
        # Heavy-tailed lengths around FineWeb's scale: median ~600, mean ~1000, some documents far longer.
        assert 500 < np.median(lengths) < 700 and 850 < lengths.mean() < 1150
        assert np.percentile(lengths, 99) > 4 * lengths.mean()


def test_synthetic_structure_is_learnable_by_a_bigram_model(synthetic):
    """A bigram model fitted on train predicts val far better than the unigram entropy allows."""
    _, written = synthetic
    fit = read_shard(written[1]).astype(np.int64)
    held_out = read_shard(written[0]).astype(np.int64)
    vocab = 50257
    unigram = np.bincount(fit, minlength=vocab) + 0.5
    unigram /= unigram.sum()
    unigram_entropy = -(unigram * np.log(unigram)).sum()
    pair_keys, pair_counts = np.unique(fit[:-1] * vocab + fit[1:], return_counts=True)
    previous_counts = np.bincount(fit[:-1], minlength=vocab)
    keys = held_out[:-1] * vocab + held_out[1:]
    index = np.minimum(np.searchsorted(pair_keys, keys), len(pair_keys) - 1)
    counts = np.where(pair_keys[index] == keys, pair_counts[index], 0)
    # Bigram counts smoothed towards the unigram (Dirichlet prior of weight 1).
    bigram = (counts + unigram[held_out[1:]]) / (previous_counts[held_out[:-1]] + 1)
    cross_entropy = -np.log(bigram).mean()
    assert unigram_entropy > 5.5  # Zipf over tens of thousands of tokens, not a handful
    assert cross_entropy < unigram_entropy - 3, (cross_entropy, unigram_entropy)


def test_synthetic_stream_is_deterministic_and_independent_of_shard_size(synthetic, tmp_path):
    from data.synthetic import write_synthetic_shards
    _, reference = synthetic
    reference_train = np.concatenate([read_shard(p) for p in reference[1:]])
    same = write_synthetic_shards(tmp_path / "same", 1_200_000, 400_000, shard_tokens=700_000, seed=3)
    assert read_shard(same[0]).tobytes() == read_shard(reference[0]).tobytes()
    np.testing.assert_array_equal(np.concatenate([read_shard(p) for p in same[1:]]), reference_train[:1_200_000])
    other = write_synthetic_shards(tmp_path / "other", 1_200_000, 400_000, shard_tokens=700_000, seed=4)
    assert (read_shard(other[1]) != reference_train[:700_000]).mean() > 0.9
    # Val and train are different streams of the same chain.
    assert (read_shard(reference[0]) != reference_train[:400_000]).mean() > 0.9
    # The chain itself comes from the seed: another seed makes other tokens frequent.
    top = [set(np.bincount(read_shard(run[0]), minlength=50257).argsort()[-21:-1]) for run in (reference, other)]
    assert len(top[0] & top[1]) < 10, top


def test_synthetic_refuses_existing_shards_and_bad_sizes(tmp_path):
    from data.synthetic import write_synthetic_shards
    write_shard(tmp_path / "synthetic_train_000004.bin", [1, 2])
    with pytest.raises(ValueError, match="already holds shards \\(synthetic_train_000004.bin"):
        write_synthetic_shards(tmp_path, 10, 10)
    for sizes, message in [((0, 10, 10), "train_tokens must be a positive integer, got 0"),
                           ((10, -1, 10), "val_tokens must be a positive integer, got -1"),
                           ((10, 10, 0), "shard_tokens must be a positive integer, got 0")]:
        with pytest.raises(ValueError, match=message):
            write_synthetic_shards(tmp_path / "new", *sizes)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="cannot create the output directory .*a_file/sub"):
        write_synthetic_shards(tmp_path / "a_file" / "sub", 10, 10)


def test_synthetic_command_line(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path
    from data.synthetic import main
    script = Path(__file__).resolve().parents[1] / "data" / "synthetic.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "a"), "--train-tokens", "5000",
                             "--val_tokens=300", "--shard_tokens", "2000", "--seed", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 5000 train + 300 val synthetic tokens (seed 1) in 4 shards" in result.stdout
    assert [check_shard_header(tmp_path / "a" / f"synthetic_train_{i:06d}.bin") for i in (1, 2, 3)] == [2000, 2000,
                                                                                                        1000]
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    for option in ("--train_tokens", "--train-tokens", "--val_tokens", "--shard_tokens", "--seed", "--out"):
        assert option in help_text
    assert "default: 10000000" in help_text and "default: 1000000)" in help_text
    out = ["--out", str(tmp_path / "b"), "--val_tokens", "10"]  # where a broken check would write, small
    for argv, message in [(out + ["--train_tokens", "9", "--seed", "1", "--seed=2"], "argument --seed: given twice"),
                          (out + ["--train_tokens", "5", "--train-tokens", "6"],
                           "argument --train_tokens: given twice"),
                          (["--val_tokens", "many"], "argument --val_tokens/--val-tokens: invalid int value"),
                          (out + ["--train_tok", "5"], "unrecognized arguments: --train_tok"),
                          (["--out", str(tmp_path / "a")], "already holds shards")]:
        assert_user_error(capsys, main, argv, re.escape(message))
