"""`reslab data prepare` (tokenize a corpus once into shards) and `reslab data info` (what a data directory holds)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from reslab.errors import ReslabError


def register(commands) -> None:
    data = commands.add_parser("data", help="prepare a corpus into memory-mapped token shards, or inspect one")
    actions = data.add_subparsers(dest="action", required=True, parser_class=type(data))
    prepare = actions.add_parser("prepare", help="tokenize text files once into shards + manifest.json",
                                 epilog="example: reslab data prepare corpus/ --tokenizer bpe --vocab-size 4096 "
                                 "--out data/corpus")
    prepare.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="text files, globs, directories of text, or hf:NAME_OR_FOLDER[:SPLIT] (a Hugging Face "
                         "dataset on this machine)")
    prepare.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="the directory to write: shards, tokenizer.reslab.json, manifest.json (resumed if "
                         "interrupted)")
    prepare.add_argument("--tokenizer", default="char", help="char (default), bpe (trained here), gpt2 (from the local "
                         "Hugging Face cache) or a tokenizer.json file")
    prepare.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 512)")
    prepare.add_argument("--bpe-sample-mb", type=float, help="train BPE on the first this many MB (default: all)")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="tokenizer processes (default: one per core)")
    prepare.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 16,777,216)")
    prepare.add_argument("--val-fraction", type=float, default=0.1,
                         help="the last this fraction of the tokens is validation (default 0.1)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress line")
    prepare.set_defaults(handler=cmd_prepare)
    info = actions.add_parser("info", help="what a prepared directory holds (reslab, nanoGPT or modded-nanogpt)",
                              epilog="example: reslab data info data/corpus --verify")
    info.add_argument("dir", type=Path, metavar="DIR", help="a prepared data directory")
    info.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    info.add_argument("--vocab-size", type=int, help="vocabulary of nanoGPT data without meta.pkl")
    info.set_defaults(handler=cmd_info)


def cmd_prepare(args: argparse.Namespace) -> int:
    from reslab.data.prepare import DEFAULT_SHARD_TOKENS, PrepareOptions, describe, prepare_data
    from reslab.data.tokenizer import check_bpe_settings

    check_bpe_settings(args.tokenizer, vocab_size=args.vocab_size, bpe_sample_mb=args.bpe_sample_mb)
    if args.tokenizer == "bpe" and args.vocab_size is None:
        args.vocab_size = 512
    if args.bpe_sample_mb is not None and not 0 < args.bpe_sample_mb < math.inf:
        raise ReslabError(f"--bpe-sample-mb must be a positive number of megabytes, got {args.bpe_sample_mb}; leave "
                          "it out to train on all the text")
    options = PrepareOptions(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, workers=args.workers, val_fraction=args.val_fraction,
        shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        bpe_sample_bytes=None if args.bpe_sample_mb is None else int(args.bpe_sample_mb * 1e6),
        progress=not args.no_progress)
    manifest = prepare_data(args.sources, args.out, options)
    print(f"{args.out}: {describe(manifest)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from reslab.data.shards import check_vocab_flag, open_prepared

    if not args.dir.is_dir():
        raise ReslabError(f"{args.dir} is not a directory; give a prepared data directory")
    check_vocab_flag(args.dir, args.vocab_size)
    data = open_prepared(args.dir, args.vocab_size, verify=args.verify)
    record = data.record
    print(f"{args.dir}: {record['format']} data, tokenizer {data.tokenizer!r}")
    print(f"tokens: {record['tokens']:,} ({record['train_tokens']:,} train, {record['val_tokens']:,} validation)")
    print(f"fingerprint: {record['fingerprint']}" + ("  (every shard's checksum verified)" if args.verify else ""))
    return 0
