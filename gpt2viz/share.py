"""Share links: the whole state of a page as a short, URL-safe string, and back, with nothing stored anywhere.

    link = encode(Shared(model="gpt2", prompt="The cat", settings=SETTINGS, tokens=[262, 3290], methods="sf", ...))
    state = decode(link)       # Shared again, every field checked; ShareLinkError says what is wrong

Format `v1.<base64url>`: a JSON header (model, prompt, settings, methods, interventions, the view: selection, tab,
modes and the Why tab's comparison token) and the
generated token ids as 16-bit little-endian numbers (GPT-2 has 50,257 tokens; 17-bit ids go in a wider
array), together deflated. The token ids are the branch actually taken, so a link replays the same text on
any machine even where another CPU would round a sampled draw the other way. Decoding only parses: JSON and
numbers, a size limit before and after inflating, every field checked against the same rules as the page's
controls. No field is evaluated, and none names a file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from .interventions import InterventionError, from_dict, to_dict
from .sampling import SamplingConfig

VERSION = "v1"
MAX_LINK_CHARS = 16_000  # what a URL can carry everywhere that matters
MAX_INFLATED = 64_000  # bytes after inflating: a link cannot expand into more than this
MAX_PROMPT_CHARS = 20_000
MAX_TOKENS = 4096
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/ -]{0,99}")
METHODS = {"s": "sampled", "g": "greedy", "f": "forced"}
SETTING_NAMES = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")
LENS_MODES = ("top", "rank", "entropy")
STRIP_COLOURS = ("prob", "decided")


class ShareLinkError(ValueError):
    """A link that is malformed, truncated, too large, tampered with or of an unknown version."""


@dataclass
class Shared:
    """Everything a link replays."""

    model: str
    prompt: str
    settings: dict  # SETTING_NAMES -> value, as SamplingConfig takes them
    tokens: list[int] = field(default_factory=list)  # the generated tokens, in order
    methods: str = ""  # per generated token: s (sampled), g (greedy), f (forced by the user)
    interventions: list = field(default_factory=list)  # intervention values (the Experiment view's)
    position: int | None = None  # the selected token (None: the newest)
    layer: int = 0
    head: int = 0
    tab: str = "chosen"
    lens_mode: str = "top"  # the Lens tab's mode
    strip_colour: str = "prob"  # what the strip's colours show
    versus: int | None = None  # the Why tab's comparison token (None: the runner-up)


def encode(state: Shared) -> str:
    """The link text for `state` (checked first, so that only links `decode` accepts are ever made)."""
    check(state)
    header = {"m": state.model, "p": state.prompt, "s": [state.settings[k] for k in SETTING_NAMES], "k": state.methods,
              "i": [to_dict(iv) for iv in state.interventions], "v": [state.position, state.layer, state.head, state.tab, state.lens_mode, state.strip_colour, state.versus]}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    wide = any(t > 0xFFFF for t in state.tokens)
    ids = np.asarray(state.tokens, dtype="<u4" if wide else "<u2").tobytes()
    body = bytes([1 if wide else 0]) + len(head).to_bytes(4, "little") + head + ids
    return f"{VERSION}." + base64.urlsafe_b64encode(zlib.compress(body, 9)).decode("ascii").rstrip("=")


def decode(link) -> Shared:
    """The state in a link made by `encode`; `ShareLinkError` for anything else."""
    if not isinstance(link, str) or not link:
        raise ShareLinkError("This link holds no page: it is empty.")
    if len(link) > MAX_LINK_CHARS:
        raise ShareLinkError(f"This link is too long ({len(link)} characters; a page's link has at most {MAX_LINK_CHARS}).")
    version, _, data = link.strip().partition(".")
    if version != VERSION:
        raise ShareLinkError(f"This link is of an unknown kind ({version[:8]!r}); links from this app start with {VERSION}.")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", data):
        raise ShareLinkError("This link is damaged: it has characters a link of this app never has.")
    try:
        packed = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        inflater = zlib.decompressobj()
        body = inflater.decompress(packed, MAX_INFLATED)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ShareLinkError("This link is damaged or cut short (it does not inflate to a page).")
    except (binascii.Error, zlib.error, ValueError) as e:
        if isinstance(e, ShareLinkError):
            raise
        raise ShareLinkError("This link is damaged or cut short (it does not decode).") from None
    if len(body) < 5 or body[0] not in (0, 1):
        raise ShareLinkError("This link is damaged: its contents are not a page.")
    n = int.from_bytes(body[1:5], "little")
    head, ids = body[5:5 + n], body[5 + n:]
    width = 4 if body[0] else 2
    if len(head) != n or len(ids) % width:
        raise ShareLinkError("This link is damaged or cut short: its parts do not add up.")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShareLinkError("This link is damaged: its header is not readable.") from None
    if not isinstance(header, dict) or set(header) != {"m", "p", "s", "k", "i", "v"}:
        raise ShareLinkError("This link is damaged: its header does not describe a page.")
    s, v = header["s"], header["v"]
    if not (isinstance(s, list) and len(s) == len(SETTING_NAMES) and isinstance(v, list) and len(v) in (4, 7)):
        raise ShareLinkError("This link is damaged: its settings or selection are incomplete.")
    if not isinstance(header["i"], list):
        raise ShareLinkError("This link is damaged: its interventions are not a list.")
    try:
        interventions = [from_dict(d) for d in header["i"]]
    except InterventionError as e:
        raise ShareLinkError(f"This link's experiment is not valid: {e}") from None
    state = Shared(model=header["m"], prompt=header["p"], settings=dict(zip(SETTING_NAMES, s)),
                   tokens=np.frombuffer(ids, dtype="<u4" if width == 4 else "<u2").astype(int).tolist(),
                   methods=header["k"], interventions=interventions, position=v[0], layer=v[1], head=v[2], tab=v[3])
    if len(v) == 7:  # links made before the view's modes were kept have 4
        state.lens_mode, state.strip_colour, state.versus = v[4], v[5], v[6]
    check(state)
    return state


def _index(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10_000_000:
        raise ShareLinkError(f"This link's {name} is not a valid number.")


def check(state: Shared) -> None:
    """Every field against the rules of the page's controls (a `ShareLinkError` names the first that fails)."""
    if not isinstance(state.model, str) or not MODEL_NAME.fullmatch(state.model) or ".." in state.model:
        raise ShareLinkError("This link names no valid model.")
    if not isinstance(state.prompt, str) or not state.prompt or len(state.prompt) > MAX_PROMPT_CHARS:
        raise ShareLinkError(f"This link's prompt must be a text of 1 to {MAX_PROMPT_CHARS} characters.")
    if not isinstance(state.settings, dict) or set(state.settings) != set(SETTING_NAMES):
        raise ShareLinkError("This link's sampling settings are incomplete.")
    try:
        SamplingConfig(**state.settings)
    except ValueError as e:
        raise ShareLinkError(f"This link's sampling settings are not valid: {e}") from None
    tokens = state.tokens
    if not isinstance(tokens, list) or len(tokens) > MAX_TOKENS:
        raise ShareLinkError(f"This link holds more than {MAX_TOKENS} generated tokens.")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**17 for t in tokens):
        raise ShareLinkError("This link's tokens are not token ids.")
    if not isinstance(state.methods, str) or len(state.methods) != len(tokens) or set(state.methods) - set(METHODS):
        raise ShareLinkError("This link's record of how each token was chosen does not match its tokens.")
    if not isinstance(state.interventions, list) or len(state.interventions) > 64:
        raise ShareLinkError("This link's experiment is not valid.")
    for iv in state.interventions:
        try:
            from_dict(to_dict(iv))
        except InterventionError as e:
            raise ShareLinkError(f"This link's experiment is not valid: {e}") from None
    _index("selected token", state.position, allow_none=True)
    _index("layer", state.layer)
    _index("head", state.head)
    if not isinstance(state.tab, str) or not re.fullmatch(r"[a-z]{1,16}", state.tab):
        raise ShareLinkError("This link opens an unknown tab.")
    if state.lens_mode not in LENS_MODES or state.strip_colour not in STRIP_COLOURS:
        raise ShareLinkError("This link asks for a view mode the page does not have.")
    _index("comparison token", state.versus, allow_none=True)
