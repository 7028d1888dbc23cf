"""Regenerate ldm_engine/data/clip/{vocab.json.gz,merges.txt.gz} from OpenAI CLIP's BPE file.

Source: ``bpe_simple_vocab_16e6.txt.gz`` as shipped by OpenAI CLIP and by the ``open_clip_torch``
wheel (MIT licence). Get it without installing anything::

    pip download --no-deps open_clip_torch && unzip -j open_clip_torch-*.whl '*/bpe_simple_vocab_16e6.txt.gz'
    python tools/make_clip_vocab.py bpe_simple_vocab_16e6.txt.gz

The vocabulary is defined by CLIP's tokenizer: the 256 byte symbols, the same symbols with the
end-of-word marker "</w>", one entry per merge (the first 49152 - 256 - 2 merges), then the two
special tokens -- 49408 entries in all, identical to openai/clip-vit-large-patch14's vocab.json.
"""

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # CLIP's BPE vocabulary was capped at 49152 symbols
OUT_DIR = Path(__file__).resolve().parent.parent / "ldm_engine" / "data" / "clip"


def byte_symbols():
    """GPT-2/CLIP's printable stand-in for each byte value, in vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    order, symbols = list(printable), [chr(b) for b in printable]
    shift = 0
    for b in range(256):
        if b not in printable:  # whitespace/control bytes get code points above 255
            order.append(b)
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def build(bpe_gz):
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a header
    assert len(merges) == NUM_MERGES and all(len(m) == 2 for m in merges)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default: %(default)s)")
    args = parser.parse_args()
    vocab, merges = build(args.bpe_gz)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # mtime=0: byte-identical output on every run, so regenerating leaves git clean.
    with open(out / "vocab.json.gz", "wb") as raw, gzip.GzipFile("vocab.json", "wb", 9, raw, mtime=0) as f:
        f.write(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    with open(out / "merges.txt.gz", "wb") as raw, gzip.GzipFile("merges.txt", "wb", 9, raw, mtime=0) as f:
        f.write(("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main()
