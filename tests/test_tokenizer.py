"""ldm_engine.tokenizer against transformers' CLIPTokenizer and a plain-Python CLIP BPE.

transformers 5.x has a single CLIPTokenizer (backed by the tokenizers library, like ours), so the
ids are also checked against an independent pure-Python implementation of OpenAI CLIP's BPE
(simple_tokenizer.py's algorithm with transformers' text normalisation).
"""

import gzip
import json
import random
import shutil
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

from ldm_engine.tokenizer import SHIPPED_VOCAB_DIR, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = 49406, 49407
PAD_TOKENS = {"<|endoftext|>": EOS, "!": 0}


def added_token(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


# tokenizer_config.json bodies: the published SD1.x/SDXL and SD2.x/SDXL-2 ones (bos/eos matched in the
# normalised text, "!" verbatim), and one where every special token must be written verbatim.
SETUPS = {
    "clip-l": ("<|endoftext|>", {"49406": added_token("<|startoftext|>", True),
                                 "49407": added_token("<|endoftext|>", True)}),
    "openclip": ("!", {"0": added_token("!", False), "49406": added_token("<|startoftext|>", True),
                       "49407": added_token("<|endoftext|>", True)}),
    "verbatim": ("!", {"0": added_token("!", False), "49406": added_token("<|startoftext|>", False),
                       "49407": added_token("<|endoftext|>", False)}),
}


def tokenizer_folder(root: Path, vocab_dir: Path, setup: str) -> Path:
    pad_token, decoder = SETUPS[setup]
    folder = root / setup
    shutil.copytree(vocab_dir, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": pad_token, "unk_token": "<|endoftext|>", "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
    return folder

HANDWRITTEN = [
    # plain and mixed case
    "a photo of a cat", "A Photo Of A CAT", "an astronaut riding a horse on mars, 4k, trending on artstation",
    "portrait of a woman, oil painting, by Rembrandt", "MiXeD cAsE PrOmPt", "x", "I", "supercalifragilisticexpialidocious",
    # accents, composed and decomposed (NFC), other Latin
    "café crème brûlée", "Ångström naïve façade", "São Paulo at dusk", "Zürich über straße", "ÉCOLE", "cafe\u0301",
    "e\u0301\u0301 a\u0308", "İstanbul", "ß SS ẞ", "ǅ ǈ", "ſ long s", "ﬁ ligature ﬀ", "Ⓐⓑⓒ", "ℌ ℍ ℕ",
    # CJK, other scripts
    "東京の夜景", "一只猫坐在窗台上", "서울의 밤", "ひらがなとカタカナ", "cat 猫 neko ねこ", "Ελληνικά ΟΔΟΣ σοφός",
    "русский текст", "עברית", "العربية", "हिन्दी", "ไทย", "ᚠᚢᚦ runes", "漢字かな交じり文, with English",
    # emoji (ZWJ sequences, flags, skin tones, variation selectors)
    "🐱 cat", "a dog 🐶🐶🐶", "👩‍🚀 astronaut", "🇫🇷 flag", "❤️ love", "👍🏽", "🤖🎨✨", "☀︎ sun",
    # punctuation and brackets (prompt weighting syntax)
    "hello, world!", "wait... what?!", "(masterpiece:1.2), [best quality], {a|b}", "a -- b — c – d",
    "\"quoted\" 'single'", "semi;colon:colon", "100% $5 #tag @user", "a/b\\c", "~~~", "...", "!!!", "!", "!!",
    "hello!world", "hi ! there", "¡hola! ¿qué?", "«guillemets» „quotes“", "a_b-c+d=e", "(((((very detailed)))))",
    # the special tokens written in the text
    "<|endoftext|>", "<|startoftext|>a<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "a<|endoftext|>b",
    "<|startoftext|><|startoftext|>",
    # numbers
    "1234567890", "3.14159", "1,000,000 stars", "8k uhd", "1990s", "v1.5", "²³ ½ Ⅻ ٣ ௰", "0x1F",
    # contractions and apostrophes
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S DON'T", "rock 'n' roll",
    "the cat's toy", "it’s curly", "''s", "'s", "o'clock", "'hello'",
    # whitespace
    "", " ", "   ", "\t", "\n", "\r\n", "a\tb\nc\r\nd", "  leading and trailing  ", "\u00a0nbsp\u00a0here",
    "\u3000ideographic space", "em\u2003space", "zero\u200bwidth", "line\u2028separator",
    # HTML-ish
    "<b>bold</b>", "&amp; &lt;tag&gt; &quot;", "<img src=\"x.png\" alt='y'>", "<!-- comment -->", "&#39;",
    "a < b > c", "<|tag|>", "https://example.com/a?b=c&d=e",
    # control characters
    "a\x00b", "\x7f", "a\u0085b", "bell\x07",
]

# Longer than 77 tokens: truncation keeps bos + the first 75 tokens + eos.
LONG = [
    "a photo of " * 40,
    "supercalifragilisticexpialidocious " * 8,
    "9" * 200,
    "😀" * 50,
    "masterpiece, best quality, ultra-detailed, 8k, " * 10 + "a cat",
    "東京" * 120,
    "!" * 10 + " wow" * 90,
]

_FRAGMENTS = ["cat", "Dog", "castle", "neon", "ÉTÉ", "naïve", "猫", "犬", "🌸", "🚀", "42", "3.5", "it's", "don't",
              "(", ")", "[", "]", ":1.4", "!", "?", "...", "&amp;", "<b>", "hyper-realistic", "O'Neil", "ΣΟΦΙΑ",
              "Москва", "ą", "∑", "\u0301", "🏳️‍🌈", "photo", "of", "a", "the", "by greg rutkowski", "\\", "_", "©"]
_SEPARATORS = [" ", " ", " ", ", ", "", "\n", "\t", "  ", " - ", "!"]


def generated_prompts(count=150, seed=20240611):
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pieces = [rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 30))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(_SEPARATORS) + piece
        prompts.append(text.upper() if rng.random() < 0.1 else text)
    return prompts


CORPUS = HANDWRITTEN + LONG + generated_prompts()


@pytest.fixture(scope="module")
def plain_vocab_dir(tmp_path_factory):
    """The shipped vocabulary uncompressed, as in a diffusers tokenizer/ folder."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(SHIPPED_VOCAB_DIR / f"{name}.gz", "rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


# ----------------------------------------------------------------------------- reference BPE
class ReferenceCLIPBPE:
    """OpenAI CLIP's BPE in plain Python (rank-greedy merges over each word), with transformers'
    text handling: special tokens matched verbatim are cut out of the raw text; the rest is NFC'd,
    whitespace runs -> " ", lower-cased char by char (no final-sigma rule), the normalised special
    tokens are cut out, and CLIP's word split runs on what is left."""

    def __init__(self, folder: Path, pad_token: str, normalized_specials=("<|startoftext|>", "<|endoftext|>")):
        regex = pytest.importorskip("regex")
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_symbol = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
        specials = {"<|startoftext|>", "<|endoftext|>", pad_token}
        self.verbatim_split = self.split_on(regex, specials - set(normalized_specials))
        self.normalized_split = self.split_on(regex, specials & set(normalized_specials))
        self.whitespace = regex.compile(r"\p{White_Space}+")
        self.words = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+")
        # transformers then applies GPT-2's split too; it only cuts "<|endoftext|>"-like words
        # that were not matched as special tokens (e.g. written in upper case).
        self.gpt2_words = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\p{White_Space}\p{L}\p{N}]+")
        self.cache = {}

    @staticmethod
    def split_on(regex, tokens):
        """str -> list of pieces, the tokens kept as their own pieces."""
        if not tokens:
            return lambda text: [text]
        return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens)) + ")").split

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        ids = [BOS]
        chunks = []  # (is a special token, text)
        for i, raw in enumerate(self.verbatim_split(text)):
            if i % 2:  # re.split puts the separators at odd indices
                chunks.append((True, raw))
            else:
                normalized = "".join(c.lower() for c in self.whitespace.sub(" ", unicodedata.normalize("NFC", raw)))
                chunks.extend((j % 2 == 1, piece) for j, piece in enumerate(self.normalized_split(normalized)))
        for special, chunk in chunks:
            if special:
                ids.append(self.vocab[chunk])
                continue
            for word in (w for clip_word in self.words.findall(chunk) for w in self.gpt2_words.findall(clip_word)):
                word = "".join(self.byte_symbol[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[s] for s in self.bpe(word))
        return ids + [EOS]


def padded(ids: list[int], pad_id: int, length: int = 77) -> list[int]:
    if len(ids) > length:
        ids = ids[: length - 1] + [EOS]
    return ids + [pad_id] * (length - len(ids))


# ----------------------------------------------------------------------------- tests
def test_corpus_is_varied():
    assert len(CORPUS) >= 200 and len(set(CORPUS)) > 190
    tok = CLIPTokenizer.default()
    assert sum(len(tok.encode(p)) > 77 for p in CORPUS) >= len(LONG)


def test_well_known_ids():
    tok = CLIPTokenizer.default()
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("A PHOTO of a  cat ") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (BOS, EOS, EOS, 49408)
    assert tok.encode("!", add_special_tokens=False) == [256]  # "!</w>"; "!" alone is id 0
    assert CLIPTokenizer.default(pad_token="!").pad_token_id == 0
    assert tok.model_max_length == 77


def test_shipped_vocabulary_files():
    vocab = json.loads(gzip.open(SHIPPED_VOCAB_DIR / "vocab.json.gz", "rt", encoding="utf-8").read())
    merges = gzip.open(SHIPPED_VOCAB_DIR / "merges.txt.gz", "rt", encoding="utf-8").read().split("\n")
    assert merges[0] == "#version: 0.2" and merges[-1] == "" and len(merges) == 1 + 48894 + 1
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    for rank, line in enumerate(merges[1:-1]):  # each merge adds the next id, in merge order
        assert vocab[line.replace(" ", "")] == 512 + rank
    assert (SHIPPED_VOCAB_DIR / "LICENSE").is_file()


def assert_same_rows(got: torch.Tensor, expected: torch.Tensor):
    assert got.dtype == torch.long and got.shape == expected.shape == (len(CORPUS), 77)
    mismatches = [(p, got[i].tolist(), expected[i].tolist()) for i, p in enumerate(CORPUS)
                  if not torch.equal(got[i], expected[i])]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"


def batch(tok: CLIPTokenizer) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn
        return tok(CORPUS)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_matches_transformers(plain_vocab_dir, tmp_path, setup):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path, plain_vocab_dir, setup)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.pad_token_id == reference.pad_token_id
    assert_same_rows(batch(tok), expected)
    for prompt in CORPUS[::7]:
        assert tok.encode(prompt) == reference(prompt).input_ids
    if setup != "verbatim":  # the shipped vocabulary with the published configs' rules
        assert_same_rows(batch(CLIPTokenizer.default(pad_token=SETUPS[setup][0])), expected)


def test_matches_transformers_without_config(plain_vocab_dir):
    """transformers built from the files alone matches every special token verbatim."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(plain_vocab_dir), pad_token="!")
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    verbatim = [{"content": t, "normalized": False} for t in ("<|startoftext|>", "<|endoftext|>", "!")]
    tok = CLIPTokenizer.from_files(plain_vocab_dir / "vocab.json", plain_vocab_dir / "merges.txt",
                                   pad_token="!", added_tokens=verbatim)
    assert_same_rows(batch(tok), expected)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_matches_reference_python_bpe(plain_vocab_dir, tmp_path, setup):
    pad_token, decoder = SETUPS[setup]
    normalized = [entry["content"] for entry in decoder.values() if entry["normalized"]]
    reference = ReferenceCLIPBPE(plain_vocab_dir, pad_token, normalized)
    tok = CLIPTokenizer.from_pretrained(tokenizer_folder(tmp_path, plain_vocab_dir, setup))
    mismatches = [(p, tok.encode(p), reference.encode(p)) for p in CORPUS if tok.encode(p) != reference.encode(p)]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"
    expected = torch.tensor([padded(reference.encode(p), PAD_TOKENS[pad_token]) for p in CORPUS])
    assert_same_rows(batch(tok), expected)


def test_special_tokens_written_in_the_prompt():
    tok = CLIPTokenizer.default()
    cat = tok.encode("cat", add_special_tokens=False)
    assert tok.encode("cat<|endoftext|>cat") == [BOS, *cat, EOS, *cat, EOS]
    assert tok.encode("<|ENDOFTEXT|> cat") == [BOS, EOS, *cat, EOS]  # published rule: matched lower-cased
    assert len(tok.encode("<|endoftext")) > 3


def test_pad_token_bang_in_text_becomes_pad_id():
    """As transformers does (and so the SD2/SDXL pipelines): with pad "!" a "!" in the text is the
    special token 0; with the <|endoftext|> pad it is the word "!</w>" (256)."""
    bang = CLIPTokenizer.default(pad_token="!")
    eot = CLIPTokenizer.default()
    wow = eot.encode("wow", add_special_tokens=False)
    assert bang.encode("wow!") == [BOS, *wow, 0, EOS]
    assert eot.encode("wow!") == [BOS, *wow, 256, EOS]
    assert bang("hi")[0].tolist() == [BOS, eot.encode("hi")[1], EOS] + [0] * 74
    assert eot("hi")[0].tolist() == [BOS, eot.encode("hi")[1]] + [EOS] * 75


def test_truncation_warns_once_with_dropped_count():
    tok = CLIPTokenizer.default()
    prompts = [LONG[0], "short", LONG[2]]
    lengths = [len(tok.encode(p)) for p in prompts]
    dropped = [max(0, n - 77) for n in lengths]
    assert dropped[0] > 0 and dropped[1] == 0 and dropped[2] > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(prompts)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"{sum(dropped)} token(s) were dropped" in message
    assert f"prompt 0: {dropped[0]} token(s)" in message and f"prompt 2: {dropped[2]} token(s)" in message
    assert "prompt 1" not in message
    assert caught[0].filename == __file__  # points at the caller
    full = tok.encode(LONG[0])
    assert ids[0].tolist() == full[:76] + [EOS]
    assert ids[1].tolist() == tok.encode("short") + [EOS] * (77 - len(tok.encode("short")))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok(["short", "a photo of " * 25])  # 75 words + bos + eos: exactly 77, nothing dropped
    assert caught == []


def test_empty_and_whitespace_prompts():
    tok = CLIPTokenizer.default(pad_token="!")
    ids = tok(["", " \t\n "])
    assert ids.tolist() == [[BOS, EOS] + [0] * 75] * 2
    assert tok([]).shape == (0, 77)


def test_bad_prompts_raise_type_error():
    tok = CLIPTokenizer.default()
    with pytest.raises(TypeError, match="prompts"):
        tok(42)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        tok(["ok", None])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.default(pad_token="<pad>")


def test_from_pretrained_reads_pad_token_and_max_length(plain_vocab_dir, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(plain_vocab_dir, folder)
    tok = CLIPTokenizer.from_pretrained(folder)  # no config files: CLIP defaults
    assert (tok.pad_token_id, tok.model_max_length) == (EOS, 77)

    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    assert CLIPTokenizer.from_pretrained(folder).pad_token_id == 0

    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "model_max_length": 20}))
    tok = CLIPTokenizer.from_pretrained(folder)  # tokenizer_config.json wins
    assert (tok.pad_token_id, tok.model_max_length) == (EOS, 20)
    assert tok("a photo of a cat").shape == (1, 20)

    real_configs = [("sd-turbo", "tokenizer_config.json", 0), ("sdxl-turbo", "tokenizer_config.json", EOS),
                    ("sdxl-turbo", "tokenizer_2_config.json", 0), ("sd15", "tokenizer_config.json", EOS)]
    for name, filename, pad_id in real_configs:
        for root in (REPO / "ldm_engine" / "configs", REPO.parent / "shared" / "configs"):
            if (root / name / filename).is_file():
                shutil.copy(root / name / filename, folder / "tokenizer_config.json")
                tok = CLIPTokenizer.from_pretrained(folder)
                assert (tok.pad_token_id, tok.model_max_length) == (pad_id, 77), (name, filename)
                break

    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_pretrained(folder)


def test_added_tokens_beyond_the_vocabulary(plain_vocab_dir, tmp_path):
    """Textual-inversion tokenizers list their new tokens in added_tokens_decoder."""
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path, plain_vocab_dir, "openclip")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["49408"] = {**added_token("<cat-toy>", True), "special": False}
    config["added_tokens_decoder"]["49409"] = {**added_token("<Style>", False), "special": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.vocab_size == len(reference) == 49410
    for prompt in ["a <cat-toy> on a beach", "A <CAT-TOY>!", "in <Style> and <style>", "<cat-toy><cat-toy>x"]:
        assert tok.encode(prompt) == reference(prompt).input_ids
    assert tok.encode("<cat-toy>")[1] == 49408

    config["added_tokens_decoder"]["49411"] = config["added_tokens_decoder"].pop("49409")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without gaps"):
        CLIPTokenizer.from_pretrained(folder)
