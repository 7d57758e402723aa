"""The hash-keyed caches that let sweep jobs share tokenizers, base metrics and init rows."""
from __future__ import annotations

import pytest

from bailong.cache import atomic_dir, cache_key, cached_json, fingerprint, hash_texts


def test_cached_json_computes_once_per_input(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"bpc": 1.5}

    assert cached_json(tmp_path, {"a": 1}, compute) == {"bpc": 1.5}
    assert cached_json(tmp_path, {"a": 1}, compute) == {"bpc": 1.5}
    assert len(calls) == 1
    cached_json(tmp_path, {"a": 2}, compute)
    assert len(calls) == 2


def test_keys_follow_content():
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert hash_texts(["ab", "c"]) != hash_texts(["a", "bc"])  # documents are delimited


def test_fingerprint_changes_when_weights_change(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    assert fingerprint(str(tmp_path)) != before
    assert fingerprint("meta-llama/Llama-2-7b-hf") == ["meta-llama/Llama-2-7b-hf"]


def test_atomic_dir_all_or_nothing(tmp_path):
    target = tmp_path / "rows"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "rows.safetensors").write_text("ok")
    with atomic_dir(target) as tmp:  # a second job finishing later leaves the first result in place
        (tmp / "rows.safetensors").write_text("late")
    assert (target / "rows.safetensors").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["rows"]
