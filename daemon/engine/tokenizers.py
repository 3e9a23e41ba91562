"""Deterministic stand-in tokenizers for the tiny preset: any prompt -> token ids, no tokenizer files.

Words are hashed (BLAKE2b) into the real vocabularies' id ranges, so different prompts and trigger words give
different ids, the same prompt always gives the same ids, and shapes match what mflux's encoders expect
(T5: padded to max_length; CLIP: 77 ids with end-of-text, which CLIP pooling locates by argmax).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from mflux.models.common.tokenizer.tokenizer_output import TokenizerOutput

from daemon.engine.runtime import mx

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _word_ids(prompt: str, vocab: int, reserved_low: int, salt: bytes) -> list[int]:
    ids = []
    for word in _WORD.findall(prompt.lower()):
        h = hashlib.blake2b(word.encode("utf-8"), digest_size=8, person=salt).digest()
        ids.append(reserved_low + int.from_bytes(h, "little") % (vocab - reserved_low))
    return ids


class StandInTokenizer:
    """Implements mflux's Tokenizer protocol (`tokenize(prompt) -> TokenizerOutput`)."""

    tokenizer = None  # mflux's protocol names the wrapped HF tokenizer; there is none

    def __init__(self, *, vocab: int, max_length: int, pad_id: int, eos_id: int, reserved_low: int, salt: bytes):
        self.vocab, self.max_length = vocab, max_length
        self.pad_id, self.eos_id, self.reserved_low, self.salt = pad_id, eos_id, reserved_low, salt

    def tokenize(self, prompt, images=None, max_length=None, **kwargs) -> TokenizerOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        length = max_length or self.max_length
        rows, masks = [], []
        for p in prompts:
            ids = _word_ids(p or "", self.vocab, self.reserved_low, self.salt)[: length - 1] + [self.eos_id]
            mask = [1] * len(ids) + [0] * (length - len(ids))
            rows.append(ids + [self.pad_id] * (length - len(ids)))
            masks.append(mask)
        return TokenizerOutput(
            input_ids=mx.array(np.asarray(rows, dtype=np.int32)),
            attention_mask=mx.array(np.asarray(masks, dtype=np.int32)),
        )


def t5_stand_in(max_length: int = 256) -> StandInTokenizer:
    # T5: pad 0, eos 1, ids from 3 up (0..2 are special), vocabulary 32128 (mflux's embedding size).
    return StandInTokenizer(vocab=32100, max_length=max_length, pad_id=0, eos_id=1, reserved_low=3, salt=b"t5")


def clip_stand_in() -> StandInTokenizer:
    # CLIP: 77 positions; end-of-text 49407 is the largest id, pads with it too (as the real tokenizer does),
    # so argmax finds the first end-of-text. A begin-of-text id is not needed for a stand-in.
    return StandInTokenizer(vocab=49406, max_length=77, pad_id=49407, eos_id=49407, reserved_low=1, salt=b"clip")
