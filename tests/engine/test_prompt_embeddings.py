"""The prompt-embedding cache mflux reads and fills, filed per text-encoder state (no model needed)."""

from __future__ import annotations

from daemon.engine.model import PromptEmbeddings


def test_embeddings_are_filed_per_text_encoder_state():
    state = [()]
    cache = PromptEmbeddings(max_entries=8)
    cache.state = lambda: state[0]
    cache["saloon"] = plain = ("t5", "clip")
    assert "saloon" in cache and cache["saloon"] is plain and cache.get("saloon") is plain

    state[0] = (("/loras/te.safetensors", 1.0, "sig"),)  # a stack that reaches a text encoder
    assert "saloon" not in cache and cache.get("saloon") is None and len(cache) == 0 and list(cache) == []
    cache["saloon"] = patched = ("t5'", "clip'")
    assert cache["saloon"] is patched and cache.total == 2

    state[0] = ()  # no stack, or one that leaves the encoders alone: the same state
    assert cache["saloon"] is plain and list(cache) == ["saloon"] and len(cache) == 1
    state[0] = (("/loras/te.safetensors", 1.0, "sig"),)
    assert cache["saloon"] is patched
    state[0] = (("/loras/te.safetensors", 0.5, "sig"),)  # another scale: another state
    assert "saloon" not in cache
    cache.clear()
    assert cache.total == 0


def test_bounded_over_all_states_least_recently_used_first():
    state = [0]
    cache = PromptEmbeddings(max_entries=3)
    cache.state = lambda: state[0]
    cache["a"] = 1
    state[0] = 1
    cache["a"] = 2
    cache["b"] = 3
    state[0] = 0
    assert cache["a"] == 1  # used again: now the most recent
    state[0] = 1
    cache["c"] = 4  # the fourth entry pushes out the least recently used: (1, "a")
    assert cache.total == 3 and "a" not in cache and cache["b"] == 3 and cache["c"] == 4
    state[0] = 0
    assert cache["a"] == 1
    del cache["a"]
    assert "a" not in cache and cache.total == 2
