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


def wikitext(split: str = "test", timeout_s: float = 10.0) -> Text:
    """WikiText-2 raw through `datasets`, for users who can reach it; fails fast when offline."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ConnectionError("WikiText-2 needs the Hugging Face hub, and HF_HUB_OFFLINE=1 is set")
    import socket

    try:  # probe before datasets, whose own retries can hang for minutes offline
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"WikiText-2 unreachable ({e}); use --text PATH or the default text") from None
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return Text(f"wikitext-2-raw-v1:{split}", "\n\n".join(ds["text"]))


def load_text(source: str | os.PathLike = "default") -> Text:
    """`default` (Jargon File), `wikitext` (WikiText-2 test) or a path to a UTF-8 text file."""
    if str(source) == "default":
        return jargon()
    if str(source) == "wikitext":
        return wikitext()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return Text(f"file:{path}", text)
