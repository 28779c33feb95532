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
shorter). A document can straddle two shards, as in the public set. The shards are written into
<out>.partial<pid> next to <out> and moved into <out> once all are written: a failed run leaves none, nor does
one interrupted by Ctrl-C or SIGTERM (`timeout`, `kill`), which ends with one line, exit code 130.
"""

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
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
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
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
        np.asarray(tokens, dtype="<u2").tofile(f)  # no copy when tokens are uint16 already
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


# ---- Documents ----

def iter_hub_documents(dataset_name, dataset_config):
    """Stream documents from the Hugging Face hub (needs a network; nothing is stored whole). The hub is reached
    here, on the call, so that no network is one error before any work starts."""
    try:
        from datasets import load_dataset
        dataset = load_dataset(dataset_name, name=dataset_config, split="train", streaming=True)
    except Exception as e:  # no network, no datasets package, or a wrong --hf_dataset / --hf_name
        raise ValueError(f"cannot download {dataset_name} ({dataset_config}) from the Hugging Face hub "
                         f"({type(e).__name__}: {e}); check the network and --hf_dataset / --hf_name, or tokenise "
                         f"local .txt/.jsonl text with --input FILE_OR_DIR ...") from None
    return (row["text"] for row in dataset)


def list_local_files(inputs):
    """Expand files and directories into a sorted list of .txt/.jsonl files."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise ValueError(f"{path}: directory contains no .txt or .jsonl files")
            files.extend(found)
        elif not path.exists():
            raise ValueError(f"{path}: input file does not exist")
        elif path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{path}: unsupported input type '{path.suffix}' (use .txt or .jsonl files)")
        else:
            files.append(path)
    return files


def iter_local_documents(files):
    """A .txt file is one document; a .jsonl file holds one {"text": ...} document per line."""
    for path in files:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
                continue
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_number}: malformed JSON "
                                         f"({e.msg} at column {e.colno})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path}:{line_number}: expected a JSON object with a string field "
                                         f"\"text\", got {line.strip()[:80]!r}")
                    yield record["text"]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None


# ---- Tokenisation ----

_encoding = None


def _load_encoding():
    """Load the GPT-2 encoding once per process (the parent first, so that a failure is one error)."""
    global _encoding
    if _encoding is not None:
        return
    import tiktoken
    try:
        _encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads the encoding on first use: network, proxy or cache errors
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise ValueError(f"cannot load the GPT-2 encoding ({type(e).__name__}: {e}); tiktoken downloads it on "
                         f"first use and {where}. Connect to the network once, or point TIKTOKEN_CACHE_DIR "
                         f"at a directory holding tiktoken's gpt2 cache files") from None


def tokenize_document(text):
    """One document -> uint16 tokens, starting with the end-of-text separator."""
    if _encoding is None:
        _load_encoding()
    # GPT-2 ids are < 50257, so uint16 holds them; encode_ordinary treats "<|endoftext|>" in text as plain text.
    return np.array([EOT_TOKEN] + _encoding.encode_ordinary(text), dtype=np.uint16)


def rechunk(arrays, first_tokens, tokens_per_chunk):
    """Concatenate a stream of 1-D token arrays and cut it into uint16 arrays of first_tokens, then of
    tokens_per_chunk each; the last one holds what is left (never empty)."""
    buffer = np.empty(first_tokens, dtype=np.uint16)
    filled = 0
    for tokens in arrays:
        while len(tokens):
            take = min(len(tokens), len(buffer) - filled)
            buffer[filled:filled + take] = tokens[:take]
            filled += take
            tokens = tokens[take:]
            if filled == len(buffer):
                yield buffer
                buffer = np.empty(tokens_per_chunk, dtype=np.uint16)
                filled = 0
    if filled:
        yield buffer[:filled]


def shard_path(out_dir, index):
    split = "val" if index == 0 else "train"
    return Path(out_dir) / f"fineweb_{split}_{index:06d}.bin"


def _prctl():
    """Linux's prctl, or None."""
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


def _start_tokeniser():
    """A pool worker dies with the process that made it (Linux's PR_SET_PDEATHSIG): after an interrupt the parent
    exits without stopping the pool, and a worker it killed would be replaced by the pool's worker handler."""
    if _prctl():
        _prctl()(1, signal.SIGKILL)
    _load_encoding()


@contextlib.contextmanager
def tokenisers(workers):
    """A pool of tokenisers that ignore Ctrl-C and die on SIGTERM (set before the fork, so no worker starts
    without them): the parent alone handles both, with one message. After an interrupt the pool is not
    terminate()d: that joins the pool's threads, and the interrupt may have come while this thread held one of their
    locks (a hang seen once in CI); main() leaves with os._exit, and the workers die with it."""
    handlers = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        pool = multiprocessing.Pool(workers, initializer=_start_tokeniser)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    try:
        yield pool
    except KeyboardInterrupt:
        if not _prctl():  # elsewhere: kill them (a replacement the pool starts meanwhile may outlive the parent)
            for worker in multiprocessing.active_children():
                worker.kill()
        raise
    except BaseException:
        pool.terminate()
        raise
    pool.terminate()


def tokenize_to_shards(documents, out_dir, val_tokens, shard_tokens, max_train_shards=None, workers=None,
                       expected_tokens=None):
    """Tokenise documents in parallel and write shard 0 (val, val_tokens) then train shards of shard_tokens.

    The shards are written into the sibling folder <out_dir>.partial<pid>, then moved into out_dir: a failed
    run leaves no partial set in out_dir. Returns the list of written shard paths."""
    if val_tokens < 1 or shard_tokens < 1:
        raise ValueError(f"--val_tokens and --shard_tokens must be positive, got {val_tokens} and {shard_tokens}")
    if max_train_shards is not None and max_train_shards < 1:
        raise ValueError(f"--max_train_shards must be at least 1, got {max_train_shards}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers} (leave it out to use all "
                         f"{os.cpu_count()} cores)")
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: choose a folder for the shards")
    # Shards left from another run would silently mix two datasets.
    existing = sorted(p.name for p in out_dir.glob("fineweb_*.bin"))
    if existing:
        raise ValueError(f"{out_dir} already holds shards ({existing[0]} ...); remove them or choose another --out")
    # Here, not only in the workers: a pool replaces a worker whose initializer fails, forever.
    _load_encoding()
    partial = out_dir.resolve().with_name(f"{out_dir.resolve().name}.partial{os.getpid()}")
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {partial} ({e.strerror or e}); choose another --out") from None
    written = []
    workers = workers or os.cpu_count() or 1
    try:
        with tokenisers(workers) as pool, \
                tqdm(total=expected_tokens, unit="tok", unit_scale=True, desc="tokenising") as progress:

            def tokenized():
                for tokens in pool.imap(tokenize_document, documents, chunksize=16):
                    progress.update(len(tokens))
                    yield tokens

            for shard_index, tokens in enumerate(rechunk(tokenized(), val_tokens, shard_tokens)):
                written.append(shard_path(partial, shard_index))
                write_shard(written[-1], tokens)
                if max_train_shards is not None and shard_index == max_train_shards:
                    break
        if len(written) < 2:
            total_tokens = sum(check_shard_header(path) for path in written)
            raise ValueError(f"the input has only {total_tokens} tokens, not more than --val_tokens={val_tokens}, so "
                             f"no training shard was written; give more text or lower --val_tokens")
        out_dir.mkdir(exist_ok=True)
        for path in written:
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return [out_dir / path.name for path in written]


# ---- Command line ----

class Once(argparse.Action):
    """Store the value (const for an option with nargs=0); a second occurrence of the option, in any spelling,
    is an error. Also used by data/multiplication.py, data/synthetic.py and bench/compare_public.py."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"argument {self.option_strings[0]}: given twice")
        given.add(self.dest)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--input", action=Once, nargs="+", default=None,
                        help="local .txt/.jsonl files or directories (default: FineWeb from the HF hub)")
    parser.add_argument("--out", action=Once, default=str(Path(__file__).resolve().parent / "fineweb10B"),
                        help="output directory (default: data/fineweb10B next to this script)")
    parser.add_argument("--val_tokens", "--val-tokens", action=Once, type=int, default=100_000_000,
                        help="tokens in the val shard")
    parser.add_argument("--shard_tokens", "--shard-tokens", action=Once, type=int, default=100_000_000,
                        help="tokens per train shard")
    parser.add_argument("--max_train_shards", "--max-train-shards", action=Once, type=int, default=None,
                        help="stop after this many train shards (default: tokenise all input)")
    parser.add_argument("--workers", action=Once, type=int, default=None,
                        help="tokeniser processes, at least 1 (default: all cores)")
    parser.add_argument("--hf_dataset", "--hf-dataset", action=Once, default="HuggingFaceFW/fineweb")
    parser.add_argument("--hf_name", "--hf-name", action=Once, default="sample-10BT",
                        help="dataset config on the hub")
    args = parser.parse_args(argv)
    try:
        if args.input:
            documents = iter_local_documents(list_local_files(args.input))
        else:
            documents = iter_hub_documents(args.hf_dataset, args.hf_name)
        expected = None
        if args.max_train_shards is not None:
            expected = args.val_tokens + args.max_train_shards * args.shard_tokens
        written = tokenize_to_shards(documents, args.out, args.val_tokens, args.shard_tokens,
                                     args.max_train_shards, args.workers, expected)
    except ValueError as e:
        parser.error(str(e))  # one message, exit code 2
    except KeyboardInterrupt:  # the user's choice, not a crash: one line (the partial folder is already removed)
        print(f"\nfineweb.py: interrupted: no shards were written to {args.out}", file=sys.stderr, flush=True)
        os._exit(130)  # not sys.exit: multiprocessing's exit handler would join the interrupted pool's threads
    print(f"wrote {len(written)} shards to {args.out}: {written[0].name} ... {written[-1].name}")


def sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)  # `timeout` and `kill`: as Ctrl-C, the partial folder removed
    main()
