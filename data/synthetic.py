"""Write synthetic GPT-2-token shards, in the FineWeb shard format, for runs without FineWeb or a network.

    python data/synthetic.py                                   # 10M train + 1M val tokens into data/synthetic
    python data/synthetic.py --out DIR --train_tokens 100000000 --val_tokens 1000000 --shard_tokens 100000000 --seed 0

Output: DIR/synthetic_val_000000.bin holds --val_tokens tokens, DIR/synthetic_train_000001.bin, 000002, ...
hold --shard_tokens train tokens each (the last one may be shorter). The format is data/fineweb.py's
(written and read by its write_shard / read_shard). The val shard is written last, so its presence means
the set is complete. A directory that already holds synthetic_*.bin shards is an error, not overwritten.

The generative process (everything drawn from --seed, so the same seed gives the same bytes):
- A random sparse Markov chain over the GPT-2 vocabulary (50257 ids): every token (50256 included) has
  SUCCESSORS possible next tokens, drawn from a Zipf distribution over the 50256 ordinary ids (ranked in
  a random order), and the k-th of them is taken with probability proportional to 1 / (k + 1).
  A bigram model can learn it: the next-token entropy is at most 2.36 nats, far below the unigram (6.5).
- Documents of lognormal length (median 600, mean about 990 tokens, heavy-tailed), each starting with the
  end-of-text token 50256, the only place where 50256 occurs; the chain restarts from 50256 there.
  (The lengths are a stand-in chosen to look like web documents; FineWeb's own were not measured here.)
- Val and train are two independent streams of the same chain. A stream does not depend on the shard
  size, and a longer stream starts with the shorter one.

Speed: the chain is run on BLOCK_LANES lanes at once (numpy), each lane one slice of the stream; a lane
that starts inside a document starts from a Zipf draw instead of from its real predecessor (once in
BLOCK_STEPS tokens).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fineweb import EOT_TOKEN, Once, rechunk, write_shard  # noqa: E402  (data/fineweb.py, next to this script)

# ---- The generative process ----
VOCAB_SIZE = 50257  # GPT-2; ids 0..50255 are ordinary tokens, 50256 starts every document
SUCCESSORS = 16  # possible next tokens per token
TOKEN_ZIPF_EXPONENT = 1.0  # successors are drawn with probability ~ 1 / rank**exponent
SLOT_ZIPF_EXPONENT = 1.0  # the k-th successor is taken with probability ~ 1 / (k + 1)**exponent
DOC_LENGTH_MEDIAN = 600  # lognormal document lengths: median 600, mean 600 * exp(sigma**2 / 2) ~ 990
DOC_LENGTH_SIGMA = 1.0
BLOCK_LANES = 4096  # the stream is generated in blocks of BLOCK_LANES * BLOCK_STEPS tokens
BLOCK_STEPS = 1024
VAL_STREAM, TRAIN_STREAM = 1, 2  # seed offsets of the two streams (0 is the chain itself)


def zipf_probabilities(count, exponent):
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def markov_chain(seed):
    """(successor table [VOCAB_SIZE, SUCCESSORS] int64, unigram probs of ordinary tokens, slot CDF)."""
    rng = np.random.default_rng([seed, 0])
    ranked = rng.permutation(EOT_TOKEN)  # ranked[r] is the token of Zipf rank r
    token_probs = np.empty(EOT_TOKEN)
    token_probs[ranked] = zipf_probabilities(EOT_TOKEN, TOKEN_ZIPF_EXPONENT)
    successors = rng.choice(EOT_TOKEN, size=(VOCAB_SIZE, SUCCESSORS), p=token_probs)
    slot_cdf = np.cumsum(zipf_probabilities(SUCCESSORS, SLOT_ZIPF_EXPONENT))
    slot_cdf[-1] = 1.0
    return successors, token_probs, slot_cdf


def document_starts(rng, offset, block_tokens):
    """Positions in [0, block_tokens) where documents start, the first at `offset`; and the next offset."""
    mean_length = DOC_LENGTH_MEDIAN * np.exp(DOC_LENGTH_SIGMA ** 2 / 2)
    starts = [np.zeros(0, dtype=np.int64)]
    position = offset
    while position < block_tokens:
        lengths = rng.lognormal(np.log(DOC_LENGTH_MEDIAN), DOC_LENGTH_SIGMA,
                                size=int(block_tokens / mean_length) + 16)
        ends = position + np.cumsum(np.maximum(2, np.rint(lengths)).astype(np.int64))
        batch_starts = np.concatenate([[position], ends[:-1]])
        starts.append(batch_starts[batch_starts < block_tokens])
        # The next start: the first document end at or after the block's end (or draw more lengths).
        position = int(ends[-1]) if ends[-1] < block_tokens else int(ends[np.searchsorted(ends, block_tokens)])
    return np.concatenate(starts), position - block_tokens


def iter_stream(chain, seed, stream, num_tokens):
    """Yield the stream's first num_tokens tokens, block after block (uint16 arrays of BLOCK_LANES * BLOCK_STEPS,
    the last one cut short)."""
    successors, token_probs, slot_cdf = chain
    successors_flat = successors.ravel()
    block_tokens = BLOCK_LANES * BLOCK_STEPS
    offset = 0  # where the first document starts in the next block
    block_index = 0
    while block_index * block_tokens < num_tokens:
        rng = np.random.default_rng([seed, stream, block_index])
        starts, offset = document_starts(rng, offset, block_tokens)
        # Block layout: lane j holds stream positions j * BLOCK_STEPS ... (j + 1) * BLOCK_STEPS - 1,
        # tokens[t, j] is step t of lane j, so one numpy step advances every lane.
        is_start = np.zeros((BLOCK_STEPS, BLOCK_LANES), dtype=bool)
        is_start[starts % BLOCK_STEPS, starts // BLOCK_STEPS] = True
        slots = np.searchsorted(slot_cdf, rng.random((BLOCK_STEPS, BLOCK_LANES), dtype=np.float32), side="right")
        tokens = np.empty((BLOCK_STEPS, BLOCK_LANES), dtype=np.int64)
        tokens[0] = rng.choice(EOT_TOKEN, size=BLOCK_LANES, p=token_probs)
        tokens[0][is_start[0]] = EOT_TOKEN
        for t in range(1, BLOCK_STEPS):
            tokens[t] = successors_flat[tokens[t - 1] * SUCCESSORS + slots[t]]
            tokens[t][is_start[t]] = EOT_TOKEN
        yield tokens.T.astype(np.uint16).ravel()[:num_tokens - block_index * block_tokens]
        block_index += 1


def shard_path(out_dir, index):
    split = "val" if index == 0 else "train"
    return Path(out_dir) / f"synthetic_{split}_{index:06d}.bin"


def write_synthetic_shards(out_dir, train_tokens, val_tokens, shard_tokens=100_000_000, seed=0):
    """Write out_dir/synthetic_val_000000.bin and synthetic_train_000001.bin, ...; return their paths
    (val first). Raises ValueError for impossible sizes, existing shards or an unwritable out_dir."""
    for name, value in (("train_tokens", train_tokens), ("val_tokens", val_tokens),
                        ("shard_tokens", shard_tokens)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output directory {out_dir} ({e.strerror or e}); "
                         f"choose another --out") from None
    existing = sorted(p.name for p in out_dir.glob("synthetic_*.bin"))
    if existing:
        raise ValueError(f"{out_dir} already holds shards ({existing[0]} ...); remove them or choose another --out")
    chain = markov_chain(seed)
    written = []
    try:
        train = iter_stream(chain, seed, TRAIN_STREAM, train_tokens)
        for index, tokens in enumerate(rechunk(train, shard_tokens, shard_tokens), 1):
            written.append(shard_path(out_dir, index))
            write_shard(written[-1], tokens)
        written.insert(0, shard_path(out_dir, 0))
        write_shard(written[0], next(rechunk(iter_stream(chain, seed, VAL_STREAM, val_tokens), val_tokens, val_tokens)))
    except OSError as e:
        raise ValueError(f"cannot write shards into {out_dir} ({e.strerror or e}); choose another --out") from None
    return written


# ---- Command line ----

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    options = [("out", str, str(Path(__file__).resolve().parent / "synthetic"),
                "output directory (default: data/synthetic next to this script)"),
               ("train_tokens", int, 10_000_000, "train tokens in all (default: 10000000)"),
               ("val_tokens", int, 1_000_000, "tokens in the val shard (default: 1000000)"),
               ("shard_tokens", int, 100_000_000, "train tokens per shard (default: 100000000)"),
               ("seed", int, 0, "seed of the chain and both streams (default: 0)")]
    for name, type_, default, help_text in options:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, type=type_, default=default, help=help_text, action=Once)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        written = write_synthetic_shards(args.out, args.train_tokens, args.val_tokens, args.shard_tokens, args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.train_tokens} train + {args.val_tokens} val synthetic tokens (seed {args.seed}) in "
          f"{len(written)} shards to {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
