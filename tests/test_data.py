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
    p.write_text(prose(fortunes().text[:20_000]))  # real text, a few hundred words
    assert load_text(p).name == f"file:{p}"
    p.write_text("hello there")  # two words scored as a perplexity: refused
    with pytest.raises(ValueError, match="holds 2 words"):
        load_text(p)
    p.write_text("word\x00 " * 200)  # valid UTF-8, still binary
    with pytest.raises(ValueError, match="binary file"):
        load_text(p)
    p.write_text("\f".join(["word " * 50] * 3))  # form feeds between pages are text
    load_text(p)
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("  ")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "e.txt")


def test_wikitext_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError):
        load_text("wikitext")


def test_directory_is_named_as_one(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_text(tmp_path)


def test_wikitext_unreachable_hub_fails_in_seconds(monkeypatch):
    """No offline flag, the hub silent: the bounded probe gives up, no `datasets` retry loop."""
    import socket
    import time

    from libortho import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_HUB", {})
    monkeypatch.setattr(hub, "HUB_PROBE_S", 0.5)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
    t = time.perf_counter()
    with pytest.raises(ConnectionError, match="unreachable"):
        load_text("wikitext")
    assert time.perf_counter() - t < 3
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored by monkeypatch afterwards
