"""mom-prep: tokenize a corpus into train.bin / val.bin / meta.json (nanoGPT's format, plus Megatron .idx)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .format import META_FILE
from .pipeline import PrepSettings, prepare
from .sources import SourceOptions

EXAMPLES = """examples:
  mom-prep --source builtin --tokenizer bytes --out data/builtin
  mom-prep --source openwebtext --out data/owt --num-proc 16 --megatron-idx
  mom-prep --source 'corpus/*.jsonl' --text-field content --tokenizer gpt2:/models/gpt2 --out data/mine
  mom-prep --source books/ --txt-mode blank-line --train-tokenizer 8192 --out data/books
  mom-prep adopt data/openwebtext --tokenizer gpt2   (existing nanoGPT / Megatron files: see mom-prep adopt -h)
"""
ADOPT_DOC = """mom-prep adopt: write meta.json for token files another tool wrote, after checking them.

DIR holds train.bin and val.bin: nanoGPT's (raw ids, each document followed by end-of-text) or
Megatron's (with train.idx / val.idx beside them). The dtype comes from the .idx, or from the
file sizes and the ids; the largest id is checked against the tokenizer and the documents are
counted (end-of-text tokens, or the .idx). Then mom-train reads DIR as mom-prep's own output.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mom-prep", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="+", default=["openwebtext"], metavar="SOURCE",
                   help="'builtin' (the Python standard library's .py files, no download); local files "
                        "(.txt, .jsonl, .json, .parquet, and .html / .htm pages, read as their visible text), "
                        "folders (searched recursively) or globs; a directory written by datasets.save_to_disk; "
                        "or a Hugging Face hub dataset name (default: openwebtext)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (tiktoken, as nanoGPT; offline use gpt2:DIR with vocab.json + merges.txt, or set "
                        "MOM_GPT2_DIR), another tiktoken encoding, bytes (256 bytes + end-of-text), a local "
                        "tokenizer.json / tokenizer folder, or a Hugging Face tokenizer name (default: gpt2)")
    p.add_argument("--train-tokenizer", type=int, metavar="N",
                   help="train a byte-level BPE of N tokens on the corpus and save it as OUT/tokenizer.json "
                        "(replaces --tokenizer)")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizer worker processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.0005,
                   help="chance that a document goes to val.bin (default 0.0005, as nanoGPT); if no document is "
                        "drawn, the last one goes to val")
    p.add_argument("--seed", type=int, default=2357, help="seed of the train/val draw (default 2357, as nanoGPT)")
    p.add_argument("--text-field", default="text", help="record field holding the text in .jsonl/.json/.parquet "
                                                        "and datasets (default: text)")
    p.add_argument("--txt-mode", choices=("file", "blank-line"), default="file",
                   help=".txt files: 'file' = each file is one document (default); 'blank-line' = documents "
                        "are separated by blank lines (streamed, for big files)")
    p.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                   help="bytes that are not UTF-8: 'strict' stops with the file and offset (default); "
                        "'replace' substitutes U+FFFD")
    p.add_argument("--hf-split", default="train", help="split of a hub or saved dataset to read (default: train)")
    p.add_argument("--hf-config", help="configuration name of a hub dataset")
    p.add_argument("--no-streaming", action="store_true", help="download a hub dataset whole instead of streaming it")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype: auto = uint16 when the vocabulary fits, else uint32")
    p.add_argument("--megatron-idx", action="store_true",
                   help="also write train.idx / val.idx so Megatron-DeepSpeed and gpt-neox read --data-path OUT/train")
    p.add_argument("--overwrite", action="store_true", help="replace a finished OUT (otherwise re-running is a no-op)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def build_adopt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mom-prep adopt", description=ADOPT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, metavar="DIR", help="the folder holding train.bin and val.bin")
    p.add_argument("--tokenizer", default="gpt2",
                   help="the tokenizer the files were made with, in mom-prep's --tokenizer forms (default: gpt2, "
                        "nanoGPT's; offline gpt2:DIR or MOM_GPT2_DIR)")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype: auto = from the .idx, or from the file sizes and ids (uint32 also reads "
                        "int32 files)")
    p.add_argument("--force", action="store_true", help="replace an existing meta.json")
    p.add_argument("--quiet", action="store_true", help="no line per file read")
    return p


def settings_from_args(args: argparse.Namespace) -> PrepSettings:
    options = SourceOptions(text_field=args.text_field, txt_mode=args.txt_mode, encoding_errors=args.encoding_errors,
                            hf_split=args.hf_split, hf_config=args.hf_config, streaming=not args.no_streaming)
    return PrepSettings(source=args.source, tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                        dtype=args.dtype, megatron_idx=args.megatron_idx, train_tokenizer=args.train_tokenizer,
                        source_options=options)


def main(argv: list[str] | None = None) -> int:
    from mom_ds.errors import run_command

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adopt"]:
        adopt_args = build_adopt_parser().parse_args(argv[1:])
        return run_command("mom-prep adopt", lambda: adopt_dir(adopt_args))
    args = build_parser().parse_args(argv)
    return run_command("mom-prep", lambda: prep(args))


def adopt_dir(args: argparse.Namespace) -> int:
    from .adopt import adopt

    done = adopt(args.dir, args.tokenizer, args.dtype, args.force, show_progress=not args.quiet)
    largest = max(s["max_token_id"] for s in done.meta["splits"].values())
    print(f"mom-prep adopt: wrote {args.dir / META_FILE}: {summary(done.meta, f', largest id {largest}')}; read "
          f"{done.n_bytes / 1e6:,.1f} MB at {done.n_bytes / 1e6 / max(done.seconds, 1e-9):,.0f} MB/s")
    return 0


def summary(meta: dict, more: str = "") -> str:
    """Each split's tokens and documents, the dtype and the vocabulary, from a meta.json record."""
    splits = ", ".join(f"{name} {s['n_tokens']:,} tokens / {s['n_documents']:,} docs"
                       for name, s in meta["splits"].items())
    return f"{splits} ({meta['dtype']}, vocab {meta['tokenizer']['vocab_size']}{more})"


def prep(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = prepare(settings_from_args(args), args.out, num_proc=args.num_proc, overwrite=args.overwrite,
                     show_progress=not args.quiet)
    if result.skipped:
        print(f"mom-prep: {args.out} is already prepared with these settings; nothing to do (--overwrite to redo)")
        return 0
    print(f"mom-prep: wrote {args.out} in {time.perf_counter() - start:.1f}s: {summary(result.meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
