"""Test helpers shared by every room: a stand-in daemon over the real socket, LoRA file factories,
raw frame helpers."""
