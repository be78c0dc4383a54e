"""The offline GPT-2 tokenizer against tiktoken's own r50k_base definition."""

import hashlib
import importlib
import shutil

import pytest

from gpt2viz import TokenizerFileError, load_tokenizer
from gpt2viz.tokenizer import BPE_FILE, encode

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, Ångström, Straße, résumé — «guillemets» and ‘quotes’.",
    "東京は日本の首都です。中文测试：你好，世界！한국어 텍스트.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 and 🤖🤖🤖",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "    leading spaces,   runs   of    spaces,\n\n\n\nnewlines\r\n and tabs\t\t\tend   ",
    "It's they're we've I'd you'll he'S 'quoted' don't",
    "Numbers 1234567890 3.14159 1e-10 0x1F $100,000.00 50%",
    "The literal text <|endoftext|> in the middle, and <|endoftext|>",
    "",
    " ",
    "\n",
    "Zero-width\u200bjoiner\u200d and combining e\u0301 and NBSP\u00a0here",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, monkeypatch_module):
    """tiktoken.get_encoding('r50k_base'), fed our file through tiktoken's own download cache."""
    import hashlib as h

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(BPE_FILE, cache / h.sha1(R50K_URL.encode()).hexdigest())
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    import tiktoken.registry

    importlib.reload(tiktoken.registry)
    return tiktoken.registry.get_encoding("r50k_base")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_vocabulary_and_special_token(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot_token == 50256
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [50256]


@pytest.mark.parametrize("text", CORPUS)
def test_same_ids_as_tiktoken_r50k_base_and_lossless(tokenizer, reference, text):
    ours = tokenizer.encode_ordinary(text)
    assert ours == reference.encode_ordinary(text)
    assert tokenizer.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert tokenizer.decode(ours) == text
    assert tokenizer.decode(encode(tokenizer, text)) == text


def test_known_ids(tokenizer):
    # Well-known GPT-2 ids, from the original encoder.json: "Hello" 15496, " world" 995.
    assert tokenizer.encode_ordinary("Hello world") == [15496, 995]


def test_file_with_wrong_hash_is_refused(tmp_path):
    altered = tmp_path / "gpt2.tiktoken"
    data = bytearray(BPE_FILE.read_bytes())
    data[-3] = ord("9") if data[-3] != ord("9") else ord("8")
    altered.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(TokenizerFileError, match=f"sha256 {digest}, expected 306cd27f"):
        load_tokenizer(altered)
    with pytest.raises(TokenizerFileError, match="cannot read"):
        load_tokenizer(tmp_path / "missing.tiktoken")
