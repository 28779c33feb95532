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
