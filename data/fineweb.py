"""Tokenise text into GPT-2 token shards, the format of the public FineWeb 10B shards.

Shard format (little-endian): a header of 256 int32 = [MAGIC, VERSION, token count, 0, ...],
then the tokens as uint16. Every document starts with the end-of-text token 50256, which is
also what the training scripts use to find document boundaries.

Usage:
    python data/fineweb.py                              # FineWeb sample-10BT from the HF hub
    python data/fineweb.py --input docs/ more.jsonl     # local .txt / .jsonl files
    python data/fineweb.py --input corpus.jsonl --out data/mini --val_tokens 100000 --shard_tokens 1000000

Local input:
    .jsonl  one JSON object per line with a string field "text" = one document;
            blank lines are ignored, anything else that is not such an object is an error
            naming the file and line number.
    .txt    the WHOLE file is one document (no splitting on blank lines: paragraphs stay together).
    A directory stands for every .txt and .jsonl file under it, in sorted order.

Output: <out>/fineweb_val_000000.bin holds the first --val_tokens tokens of the stream, then
<out>/fineweb_train_000001.bin, 000002, ... hold --shard_tokens tokens each (the last one may be
shorter). A document can straddle two shards, as in the public set.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# ---- Shard format ----
MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2  # uint16
EOT_TOKEN = 50256  # GPT-2 <|endoftext|>, starts every document


def write_shard(path, tokens):
    """Write tokens (1-D integers in [0, 2**16)) as a shard with a 256-int32 header."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token values must lie in [0, 65536) to fit uint16, "
                         f"got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    path = Path(path)
    tmp_path = path.with_name(path.name + ".tmp")
    # Write to a temporary name, then rename, so an interrupted run never leaves a half shard.
    with open(tmp_path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp_path, path)


def check_shard_header(path):
    """Validate a shard's header and size without reading its tokens; return the token count.

    Raises ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            header_bytes = f.read(HEADER_BYTES)
    except OSError as e:
        raise ValueError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if len(header_bytes) < HEADER_BYTES:
        raise ValueError(f"{path}: file is {file_bytes} bytes, shorter than the {HEADER_BYTES}-byte "
                         f"header; the shard is truncated or not a shard (re-download or re-tokenise it)")
    header = np.frombuffer(header_bytes, dtype="<i4")
    if header[0] != MAGIC:
        raise ValueError(f"{path}: wrong magic number {header[0]} (expected {MAGIC}); "
                         f"not a GPT-2 token shard or corrupted")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    expected_bytes = HEADER_BYTES + TOKEN_BYTES * num_tokens
    if num_tokens < 0 or file_bytes != expected_bytes:
        raise ValueError(f"{path}: header says {num_tokens} tokens ({expected_bytes} bytes) but the file "
                         f"is {file_bytes} bytes; the shard is truncated or corrupted "
                         f"(re-download or re-tokenise it)")
    return num_tokens


def read_shard(path):
    """Read a shard's tokens as a uint16 array, after validating header and size."""
    num_tokens = check_shard_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype="<u2", count=num_tokens)
    if tokens.size != num_tokens:  # the file changed between the check and the read
        raise ValueError(f"{path}: expected {num_tokens} tokens, read {tokens.size}")
    return tokens.astype(np.uint16, copy=False)
