"""GPT-2's byte-pair tokenizer, built offline from the ranks file shipped in assets/."""

from __future__ import annotations

import base64
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import tiktoken

BPE_FILE = Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken"
# sha256 of OpenAI's r50k_base / GPT-2 ranks (also whisper/assets/gpt2.tiktoken in openai-whisper's sdist).
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
N_VOCAB = 50257
# GPT-2's pre-tokenisation regex, as tiktoken writes it for r50k_base.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerFileError(ValueError):
    """The BPE ranks file is missing, altered or malformed."""


def load_tokenizer(path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer (50,257 tokens, `<|endoftext|>` = 50256) from the local ranks file.

    The file's sha256 is checked; the network is never used.
    """
    return _load(str(Path(path) if path is not None else BPE_FILE))


@lru_cache(maxsize=4)
def _load(path: str) -> tiktoken.Encoding:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerFileError(f"cannot read the GPT-2 BPE file {path}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise TokenizerFileError(f"{path} has sha256 {digest}, expected {BPE_SHA256}: refusing an altered BPE file")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Text -> ids. A literal `<|endoftext|>` becomes the special token, as in Hugging Face's GPT-2 tokenizer."""
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})


def token_strings(tokenizer: tiktoken.Encoding, ids: list[int]) -> list[str]:
    """Each token's own text (bytes decoded leniently: a piece of a multi-byte character shows as '\ufffd')."""
    return [tokenizer.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
