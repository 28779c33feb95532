"""Download the GPT-2-tokenised FineWeb 10B shards from the Hugging Face hub.

    python data/cached_fineweb10B.py [N]

fetches fineweb_val_000000.bin and the first N train shards (default 30: 3.0B tokens, enough for the
5690-step GPT-2 Medium run, which reads 5690 x 524,288 = 2.98B) of the dataset repo
kjj0/fineweb10B-gpt2 into data/fineweb10B/ next to this script, whatever the current directory is.
A shard already there with a valid header and size is skipped; a corrupt one is downloaded again.
This saves the hour it takes to tokenise FineWeb with data/fineweb.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fineweb import check_shard_header  # noqa: E402  (data/fineweb.py, next to this script)

REPO_ID = "kjj0/fineweb10B-gpt2"
DATA_DIR = Path(__file__).resolve().parent / "fineweb10B"
MAX_TRAIN_SHARDS = 103  # the whole public set
DEFAULT_TRAIN_SHARDS = 30


def shard_names(num_train_shards):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def shard_problem(path):
    """None if path is a valid shard (header and size only, the tokens are not read), else what is wrong."""
    if not path.exists():
        return "missing"
    try:
        check_shard_header(path)
    except ValueError as e:
        return str(e)
    return None


def hf_hub_download(**kwargs):
    # Imported on first use so that checking files already on disk needs no hub client.
    from huggingface_hub import hf_hub_download as download
    return download(**kwargs)


def download_shards(num_train_shards, data_dir=DATA_DIR):
    """Make sure the val shard and the first num_train_shards train shards are in data_dir and valid.

    Returns the number of files downloaded. Raises SystemExit with one clear message on failure."""
    if not 0 <= num_train_shards <= MAX_TRAIN_SHARDS:
        raise SystemExit(f"error: the number of train shards must be between 0 and {MAX_TRAIN_SHARDS} "
                         f"(the size of {REPO_ID}), got {num_train_shards}")
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder goes (FileExistsError), or no permission
        what = "is a file, not a folder" if data_dir.exists() else f"cannot be created ({e.strerror or e})"
        raise SystemExit(f"error: {data_dir} {what}: move or delete what is in its way, the shards go there") from None
    downloaded = 0
    for name in shard_names(num_train_shards):
        path = data_dir / name
        problem = shard_problem(path)
        if problem is None:
            continue
        if problem != "missing":
            print(f"{name} is corrupt, downloading it again: {problem}")
        print(f"downloading {name} from {REPO_ID} ...", flush=True)
        try:
            # force_download: the hub client would otherwise trust its metadata and keep a corrupt local copy.
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=str(data_dir),
                            force_download=problem != "missing")
        except Exception as e:  # network, authentication, missing file, full disk: all end the same way
            raise SystemExit(f"error: downloading {name} from the Hugging Face dataset {REPO_ID} into {data_dir} "
                             f"failed: {type(e).__name__}: {e}") from None
        problem = shard_problem(path)
        if problem is not None:
            raise SystemExit(f"error: downloaded {name} but it is not a valid shard: {problem}")
        downloaded += 1
    print(f"{data_dir}: val shard and {num_train_shards} train shards present "
          f"({downloaded} downloaded, {len(shard_names(num_train_shards)) - downloaded} already there)")
    return downloaded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("num_train_shards", nargs="?", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"train shards to fetch, 100M tokens each (default {DEFAULT_TRAIN_SHARDS})")
    args = parser.parse_args(argv)
    download_shards(args.num_train_shards)


if __name__ == "__main__":
    main()
