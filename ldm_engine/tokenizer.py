"""CLIP's byte-level BPE tokenizer, built on the ``tokenizers`` library.

Gives the same ids as transformers' ``CLIPTokenizer`` (5.x) as the diffusers pipelines call it:
``tokenizer(prompts, padding="max_length", max_length=77, truncation=True)``. The pipeline:

* text is NFC-normalised, runs of whitespace become one space, then lower-cased (char by char);
* CLIP's regex splits it into words: contractions ('s 't 're 've 'm 'll 'd), letter runs,
  single digits, runs of other symbols; whitespace is dropped;
* each word is mapped byte by byte to printable symbols and merged by BPE, its last symbol
  carrying the end-of-word marker ``</w>``;
* ``<|startoftext|>`` ... ``<|endoftext|>`` wrap the result.

Special tokens are cut out before BPE, with the matching rules of the published tokenizer configs:
bos/eos in the normalised text (so "<|ENDOFTEXT|>" is the eos), the pad token "!" verbatim. With
SD2.x / SD-Turbo / SDXL's second tokenizer the pad token is "!", so a "!" in a prompt becomes id 0
(the pad id), not "!</w>" (256) as in OpenCLIP. That is what the reference pipelines feed the text
encoder, so we do the same.
"""

from __future__ import annotations

import gzip
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
SHIPPED_VOCAB_DIR = Path(__file__).resolve().parent / "data" / "clip"

# CLIP's word split (OpenAI CLIP simple_tokenizer.py); the text is already lower case here.
_CLIP_WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def _read_text(path: Path) -> str:
    """Reads a UTF-8 text file, gunzipping it when its name ends in .gz."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _find_file(path: str | Path) -> Path:
    """``path`` itself, or ``path`` + ".gz" when only the compressed file exists."""
    path = Path(path)
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    raise FileNotFoundError(f"tokenizer file not found: {path}")


def _file_key(path: Path) -> tuple:
    """(path, mtime, size, inode): a file replaced or rewritten on disk gets a new key."""
    st = path.stat()
    return (path, st.st_mtime_ns, st.st_size, st.st_ino)


def _load_vocab_and_merges(vocab_path: Path, merges_path: Path):
    """Parses vocab.json and merges.txt, cached by path *and* modification time, size and inode, so
    the shipped files are read once per process but a file replaced on disk is read again."""
    return _parse_vocab_and_merges(_file_key(vocab_path), _file_key(merges_path))


def loads_json(text: str, source) -> object:
    """json.loads, with JSON nested too deeply for the parser (RecursionError) as a ValueError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply") from None


@lru_cache(maxsize=4)
def _parse_vocab_and_merges(vocab_key: tuple, merges_key: tuple):
    vocab_path, merges_path = vocab_key[0], merges_key[0]
    try:
        text = _read_text(vocab_path)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{vocab_path} is not a UTF-8 text file: {e}") from None
    vocab = loads_json(text, vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise ValueError(f"{vocab_path} must map token strings to integer ids")
    merges = []
    try:
        merges_text = _read_text(merges_path)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{merges_path} is not a UTF-8 text file: {e}") from None
    for line_no, line in enumerate(merges_text.split("\n"), 1):
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{merges_path}:{line_no}: expected two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _check_utf8(text: str, name: str) -> None:
    """The tokenizers library takes only text encodable as UTF-8; a lone surrogate ("\\ud800")
    made it raise an unrelated TypeError (found by tests/test_fuzz.py)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: it holds a lone surrogate {text[e.start]!r} "
                         f"at position {e.start}") from None


def _check_vocab_and_merges(vocab, merges) -> None:
    """What the tokenizers library assumes without checking (it panics otherwise): ids are
    non-negative 32-bit ints, and both halves of every merge and their concatenation are tokens."""
    if not isinstance(vocab, dict) or not all(
            isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31
            for t, i in vocab.items()):
        raise ValueError("the vocabulary must map token strings to integer ids (0 <= id < 2**31)")
    for n, pair in enumerate(merges, 1):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(f"merge {n} is not a pair of strings: {str(pair)[:100]}")
        a, b = pair
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"merge {n} ({a!r} + {b!r})"[:200] + " uses or makes a token that is not in the vocabulary")


def _token_content(value, name: str) -> str | None:
    """A special token as saved by transformers: a string, or a dict with "content" (AddedToken)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read {name} from tokenizer config: {value!r}")


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length (N, model_max_length) id tensors.

    Build it with :meth:`from_pretrained` (a diffusers ``tokenizer/`` folder), :meth:`from_files`
    or :meth:`default` (the standard CLIP vocabulary shipped with ldm_engine).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, model_max_length: int = DEFAULT_MAX_LENGTH,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 added_tokens: list[dict] | None = None):
        """``added_tokens``: entries like transformers' ``added_tokens_decoder`` values plus "id"
        (content, id, special, normalized, lstrip, rstrip, single_word). They set how the special
        tokens are matched, and tokens beyond the vocabulary (textual inversion) get their ids."""
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (room for bos and eos), got {model_max_length!r}")
        for name, token in (("pad_token", pad_token), ("bos_token", bos_token),
                            ("eos_token", eos_token), ("unk_token", unk_token)):
            if not isinstance(token, str):
                raise TypeError(f"{name} must be a str, got {type(token).__name__}")
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

        _check_vocab_and_merges(vocab, merges)
        try:
            bpe = BPE(vocab=vocab, merges=merges, unk_token=unk_token, continuing_subword_prefix="",
                      end_of_word_suffix="</w>", fuse_unk=False)
        except Exception as e:  # the tokenizers library's errors are plain Exceptions
            raise ValueError(f"invalid BPE vocabulary / merges: {e}") from None
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # ByteLevel's own GPT-2 split (use_regex) changes one case only, as in transformers: a
        # "<|ENDOFTEXT|>" written in upper case reaches BPE as "<|", "endoftext", "|>".
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        self._add_tokens(tokenizer, vocab, [pad_token, bos_token, eos_token, unk_token], added_tokens or [])
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos_token}",
            special_tokens=[(bos_token, self.bos_token_id), (eos_token, self.eos_token_id)],
        )
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = model_max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _add_tokens(tokenizer: Tokenizer, vocab: dict[str, int], specials: list[str], entries: list[dict]):
        """Registers the special tokens (cut out of the text before BPE) and any extra added tokens.

        Defaults are those of the published CLIP tokenizer configs: bos/eos are matched in the
        normalised (lower-cased) text, so "<|ENDOFTEXT|>" is the eos too; any other special token
        (the pad "!") only verbatim.
        """
        flags = {t: dict(special=True, normalized=t in (BOS_TOKEN, EOS_TOKEN)) for t in specials}
        extra = []  # tokens beyond the vocabulary, as (id, content)
        for entry in entries:
            content = entry.get("content")
            token_id = entry.get("id", vocab.get(content) if isinstance(content, str) else None)
            if not isinstance(content, str) or not isinstance(token_id, int):
                raise ValueError(f"added token entries need a str 'content' and an int 'id', got {entry!r}")
            if content in vocab and vocab[content] != token_id:
                raise ValueError(f"added token {content!r} has id {token_id} but the vocabulary says {vocab[content]}")
            flags[content] = {k: bool(entry[k]) for k in ("special", "normalized", "lstrip", "rstrip", "single_word")
                              if k in entry}
            flags[content].setdefault("special", content in specials)
            if content not in vocab:
                extra.append((token_id, content))
        extra.sort()
        for offset, (token_id, content) in enumerate(extra):
            if token_id != len(vocab) + offset:
                raise ValueError(f"added token {content!r} has id {token_id}; expected {len(vocab) + offset} "
                                 f"(added tokens must follow the {len(vocab)}-token vocabulary without gaps)")
        tokens = [AddedToken(content, **kw) for content, kw in flags.items() if content in vocab]
        tokens += [AddedToken(content, **flags[content]) for _, content in extra]
        tokenizer.add_tokens(tokens)  # ids of in-vocabulary tokens are kept; extras are appended in order

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_files(cls, vocab: str | Path, merges: str | Path, *, pad_token: str = EOS_TOKEN,
                   model_max_length: int = DEFAULT_MAX_LENGTH, **options) -> CLIPTokenizer:
        """From a vocab.json and a merges.txt (either may be gzipped: name ending in .gz).
        ``options``: bos_token, eos_token, unk_token, added_tokens (see the constructor)."""
        vocab_dict, merge_list = _load_vocab_and_merges(_find_file(vocab).resolve(), _find_file(merges).resolve())
        return cls(vocab_dict, merge_list, pad_token=pad_token, model_max_length=model_max_length, **options)

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """The standard CLIP vocabulary (OpenAI CLIP's BPE, shipped in ldm_engine/data/clip).

        ``pad_token="!"`` for SD2.x / SD-Turbo and SDXL's second tokenizer, "<|endoftext|>" otherwise.
        """
        return cls.from_files(SHIPPED_VOCAB_DIR / "vocab.json.gz", SHIPPED_VOCAB_DIR / "merges.txt.gz",
                              pad_token=pad_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """From a diffusers/transformers tokenizer folder: vocab.json, merges.txt, and
        tokenizer_config.json and/or special_tokens_map.json for the special tokens, how they are
        matched, and the max length (added_tokens.json / added_tokens_decoder: extra tokens)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        settings: dict = {}
        added: dict[str, dict] = {}  # content -> added-token entry
        # Later files win: tokenizer_config.json over special_tokens_map.json, as in transformers.
        for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
            path = folder / name
            if not path.is_file():
                continue
            try:
                data = loads_json(path.read_text(encoding="utf-8"), path)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not a UTF-8 text file: {e}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path} must hold a JSON object")
            if name == "added_tokens.json":  # older format: {content: id}
                added.update({content: {"content": content, "id": i} for content, i in data.items()})
                continue
            for key in ("pad_token", "bos_token", "eos_token", "unk_token"):
                value = data.get(key)
                token = _token_content(value, key)
                if token is not None:
                    settings[key] = token
                if isinstance(value, dict):  # an AddedToken: carries its matching flags
                    added[token] = {**added.get(token, {}), **value}
            decoder = data.get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict):
                raise ValueError(f"{path}: added_tokens_decoder must be an object")
            for token_id, entry in decoder.items():
                if not isinstance(entry, dict) or not str(token_id).isdigit():
                    raise ValueError(f"{path}: bad added_tokens_decoder entry {token_id!r}: {entry!r}")
                added[entry.get("content")] = {**entry, "id": int(token_id)}
            if "model_max_length" in data:
                settings["model_max_length"] = data["model_max_length"]
        if added:
            settings["added_tokens"] = list(added.values())
        max_length = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
        # transformers writes a huge float (1e30) for "unlimited"; CLIP's positions cap it at 77.
        if isinstance(max_length, float) or (isinstance(max_length, int) and max_length > 10**6):
            settings["model_max_length"] = DEFAULT_MAX_LENGTH
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", **settings)

    # ---------------------------------------------------------------- use
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``: bos + tokens + eos (no padding, no truncation)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _check_utf8(text, "text")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens left out (words joined by single spaces)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """(N, model_max_length) int64 ids: bos + tokens + eos, padded with ``pad_token_id``.

        Prompts that are too long keep their first ``model_max_length - 2`` tokens and the eos;
        one warning per call reports what was dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        else:
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            _check_utf8(p, f"prompts[{i}]")

        length = self.model_max_length
        out = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        if not prompts:
            return out
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        truncated = []  # (prompt index, dropped ids)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            if len(ids) > length:
                truncated.append((row, ids[length - 1:-1]))
                ids = ids[:length - 1] + [self.eos_token_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        if truncated:
            self._warn_truncated(truncated)
        return out

    def _warn_truncated(self, truncated: list[tuple[int, list[int]]]) -> None:
        total = sum(len(dropped) for _, dropped in truncated)
        details = "; ".join(f"prompt {row}: {len(dropped)} token(s): {self.decode(dropped)!r}"
                            for row, dropped in truncated)
        warnings.warn(
            f"CLIP can only handle sequences up to {self.model_max_length} tokens: {total} token(s) were "
            f"dropped from the end of {len(truncated)} prompt(s) ({details})",
            UserWarning, stacklevel=3)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r}, "
                f"model_max_length={self.model_max_length})")
