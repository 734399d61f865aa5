"""Real English text: a user's file, WikiText-2 when reachable, or the Debian-packaged default.

Nothing here is written by this repo: the default corpora are the Jargon File (`jargon-text`) for
evaluation and the `fortunes` collection for calibration and general fine-tuning text, so the two never
overlap. `make` installs both packages.
"""
from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FORTUNES = Path("/usr/share/games/fortunes")
DEVIL = Path("/usr/share/dictd/devil.dict.dz")
# fortune files of plain prose and quotations (the offensive and ASCII-art sets are left out)
FORTUNE_FILES = ("computers", "science", "people", "literature", "wisdom", "work", "politics", "education",
                 "humorists", "law", "medicine", "definitions", "cookie", "fortunes", "platitudes", "love")
INSTALL_HINT = "install the Debian packages: apt-get install jargon-text fortunes dict-devil (or run `make`)"


@dataclass
class Text:
    name: str  # what was used, for the results JSON
    text: str


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {INSTALL_HINT}")
    raw = gzip.open(path, "rb").read() if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def prose(text: str, min_words: int = 20) -> str:
    """Keep paragraphs of at least `min_words` words, with whitespace folded: drops tables of contents,
    headwords and ASCII layout, keeps running prose."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if len(p.split()) >= min_words)


def jargon() -> Text:
    return Text("debian:jargon-text", prose(_read(JARGON)))


def fortunes() -> Text:
    parts = []
    for name in FORTUNE_FILES:
        path = FORTUNES / name
        if path.is_file():
            parts += [" ".join(f.split()) for f in _read(path).split("\n%\n")]
    if not parts:
        raise FileNotFoundError(f"no fortune files under {FORTUNES}; {INSTALL_HINT}")
    return Text("debian:fortunes", "\n\n".join(p for p in parts if len(p.split()) >= 8))


def wikitext(split: str = "test") -> Text:
    """WikiText-2 raw through `datasets`, for users who can reach it; fails at once (ConnectionError) when the
    hub does not answer within a few seconds (`hub.hub_unreachable`), instead of `datasets`' retries."""
    from .hub import hub_unreachable

    reason = hub_unreachable()
    if reason:
        raise ConnectionError(f"WikiText-2 needs the Hugging Face hub, which is unreachable ({reason}); "
                              "use --text PATH or the default text")
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return Text(f"wikitext-2-raw-v1:{split}", "\n\n".join(ds["text"]))


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")  # control characters other than tab, newlines, form feed
MIN_WORDS = 100  # a user's evaluation text: below this, a perplexity is a handful of tokens


def load_text(source: str | os.PathLike = "default") -> Text:
    """`default` (Jargon File), `wikitext` (WikiText-2 test) or a path to a UTF-8 text file."""
    if str(source) == "default":
        return jargon()
    if str(source) == "wikitext":
        return wikitext()
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"text {path} is a directory; pass a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    # valid UTF-8 can still be a binary file: NUL bytes, or control characters beyond a stray form feed
    controls = len(_CONTROL.findall(text))
    nul = "\x00" in text
    if nul or controls > len(text) // 100:
        raise ValueError(f"text file {path} holds {controls} control characters{' (NUL among them)' if nul else ''}: "
                         "a binary file, not text")
    words = len(text.split())
    if words < MIN_WORDS:
        raise ValueError(f"text file {path} holds {words} words; perplexity over fewer than {MIN_WORDS} is noise: "
                         "give a longer text")
    return Text(f"file:{path}", text)


def calibration_batches(tokenizer, n: int = 16, length: int = 256, offset: int = 0):
    """`n` batches (1, `length`) of token ids of public text (fortunes), disjoint from the evaluation text:
    the calibration data of `orthogonalize_` and of the Hessian statistics."""
    ids = tokenizer(fortunes().text[offset: offset + n * length * 8], add_special_tokens=False,
                    return_tensors="pt").input_ids[0]
    if ids.numel() < n * length:
        raise ValueError(f"calibration text too short: {ids.numel()} tokens < {n * length}")
    return [ids[i * length:(i + 1) * length].unsqueeze(0) for i in range(n)]
