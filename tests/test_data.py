import pytest

from libortho.data import fortunes, jargon, load_text, prose


def test_default_texts_are_real_and_disjoint():
    j, f = jargon(), fortunes()
    assert j.name == "debian:jargon-text" and len(j.text) > 500_000
    assert f.name == "debian:fortunes" and len(f.text) > 500_000
    assert j.text[:2000] not in f.text


def test_prose_keeps_paragraphs_only():
    assert prose("short\n\n" + "word " * 25) == ("word " * 25).strip()


def test_user_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello there")
    assert load_text(p).name == f"file:{p}"
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("  ")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "e.txt")


def test_wikitext_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError):
        load_text("wikitext")
