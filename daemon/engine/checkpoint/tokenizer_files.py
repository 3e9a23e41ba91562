"""Real-format tokenizer files for the miniature checkpoint, made offline and deterministically.

The real FLUX.1 snapshots ship a CLIP byte-level BPE (`tokenizer/`: vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json) and a T5 sentencepiece unigram model (`tokenizer_2/`:
spiece.model, tokenizer.json, special_tokens_map.json, tokenizer_config.json). These are files of the
same formats, loaded by the same transformers classes through mflux's TokenizerLoader, but built here:

- CLIP: the 512 byte symbols (with and without the `</w>` end-of-word mark, in CLIP's order), then
  merges for every letter bigram and trigram and as many letter 4-grams as fill the real size, then
  `<|startoftext|>` 49406 and `<|endoftext|>` 49407: the same 49408 ids as the real vocabulary, so
  end-of-text keeps the largest id (CLIP pools at the argmax id) and every id fits the embedding.
- T5: a unigram model trained with sentencepiece on a generated corpus (common prompt words plus
  syllable words, Zipf-weighted, fixed seeds) with T5's special ids (pad 0, eos 1, unk 2) and the 100
  `<extra_id_N>` tokens after it; 8100 ids, within T5's 32128-row embedding.

BPE is lossless and the unigram model covers every ASCII character, so different prompts (and trigger
words) give different ids. Both builds are deterministic: the same bytes on every run.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import random
import shutil
import string
import tempfile
from pathlib import Path

CLIP_VOCAB_SIZE = 49408  # CLIPTextModel's token embedding rows
CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

T5_PIECES = 8000  # sentencepiece pieces; T5's own model has 32000 (training that many takes a minute here)
T5_EXTRA_IDS = 100
T5_EMBEDDING_ROWS = 32128  # T5EncoderModel's shared embedding
T5_MODEL_MAX_LENGTH = 512
T5_CORPUS_SEED = 20261121

_LETTERS = string.ascii_lowercase

# Frequent words of image prompts: the unigram model learns them as whole pieces, as a real one would.
_COMMON_WORDS_TEXT = """a an the of and in on at to with for from by under over is are this that it its into near
red green blue yellow black white orange purple pink brown gray gold silver colorful fox cat dog bird horse
dragon wolf lion castle forest river lake mountain hill snow rain sun moon star sky cloud storm city street
road night day portrait photo photograph painting drawing sketch illustration style art light dark shadow fire
water stone wood glass metal old young man woman girl boy child person people face eyes hair smile hat coat
dress armor sword ship boat sea ocean beach island desert field flower tree garden house room window door
table chair book lamp candle winter summer spring autumn morning evening sunset sunrise close up wide shot
cinematic lighting detailed high quality soft sharp bright warm cold neon glow mist fog watercolor oil ink
pencil anime comic fantasy science fiction robot space planet galaxy ancient modern futuristic medieval
village market tower bridge background foreground landscape scene view beautiful small large tiny giant
standing sitting walking running flying looking holding wearing made covered full body realistic surreal"""


# ---------------------------------------------------------------- CLIP (byte-level BPE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary layout: bytes, bytes + `</w>`, one token per merge, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    want = CLIP_VOCAB_SIZE - len(vocab_list) - 2

    def grams():
        for a, b in itertools.product(_LETTERS, repeat=2):
            yield a, b
            yield a, b + "</w>"
        for a, b, c in itertools.product(_LETTERS, repeat=3):
            yield a + b, c
            yield a + b, c + "</w>"
        for a, b, c, d in itertools.product(_LETTERS, repeat=4):
            yield a + b + c, d + "</w>"

    for pair in itertools.islice(grams(), want):
        merges.append(pair)
        vocab_list.append(pair[0] + pair[1])
    vocab_list += [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE or vocab[CLIP_EOS] != CLIP_VOCAB_SIZE - 1:
        raise AssertionError("CLIP vocabulary layout is off")
    return vocab, tuple(f"{a} {b}" for a, b in merges)


def _special(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP's four tokenizer files, as in the FLUX.1 snapshots' `tokenizer/`."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": _special(CLIP_BOS),
        "eos_token": _special(CLIP_EOS),
        "pad_token": CLIP_EOS,
        "unk_token": _special(CLIP_EOS),
    }
    _write_json(folder / "special_tokens_map.json", specials)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[CLIP_BOS]): {**_special(CLIP_BOS), "special": True},
            str(vocab[CLIP_EOS]): {**_special(CLIP_EOS), "special": True},
        },
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    }
    _write_json(folder / "tokenizer_config.json", config)


# ---------------------------------------------------------------- T5 (sentencepiece unigram)


def _t5_corpus():
    rng = random.Random(T5_CORPUS_SEED)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    syllables += [c + v + e for c in consonants for v in vowels for e in "nrstl"]
    pseudo = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12000)})
    words = _COMMON_WORDS_TEXT.split() + pseudo
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(words))]  # Zipf, as in natural text
    for line in range(6000):
        sample = rng.choices(words, weights, k=12)
        if line % 5 == 0:
            sample = [w.capitalize() for w in sample]
        if line % 7 == 0:
            sample.append(str(rng.randint(0, 99999)))
        if line % 11 == 0:
            sample.append(rng.choice(string.punctuation))
        yield " ".join(sample)
    yield " ".join(string.ascii_letters + string.digits + string.punctuation)  # every ASCII character a piece


@functools.cache
def t5_sentencepiece_model() -> bytes:
    """A T5-style unigram sentencepiece model (serialized ModelProto), trained here in a few seconds."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_t5_corpus(),
        model_writer=out,
        model_type="unigram",
        vocab_size=T5_PIECES,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        input_sentence_size=0,
        num_threads=1,  # one thread: the same model bytes on every run
        minloglevel=2,
    )
    return out.getvalue()


def write_t5_tokenizer(folder: Path) -> None:
    """T5's tokenizer files, as in the FLUX.1 snapshots' `tokenizer_2/`; tokenizer.json is transformers' own
    conversion of the sentencepiece model."""
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(t5_sentencepiece_model())
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    config = {
        "add_prefix_space": True,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": T5_MODEL_MAX_LENGTH,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    with tempfile.TemporaryDirectory(prefix="easel-t5-") as scratch:
        source, converted = Path(scratch, "source"), Path(scratch, "converted")
        source.mkdir()
        shutil.copy(folder / "spiece.model", source / "spiece.model")
        _write_json(source / "tokenizer_config.json", config)
        T5Tokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(converted))
        shutil.copy(converted / "tokenizer.json", folder / "tokenizer.json")
    added = {
        "0": {**_special("<pad>"), "normalized": False, "special": True},
        "1": {**_special("</s>"), "normalized": False, "special": True},
        "2": {**_special("<unk>"), "normalized": False, "special": True},
    }
    for i, token in enumerate(reversed(extra)):  # T5 numbers <extra_id_0> last
        added[str(T5_PIECES + i)] = {**_special(token), "normalized": False, "special": True}
    _write_json(folder / "tokenizer_config.json", {**config, "added_tokens_decoder": added})
    specials = {
        "additional_special_tokens": extra,
        "eos_token": {**_special("</s>"), "normalized": False},
        "pad_token": {**_special("<pad>"), "normalized": False},
        "unk_token": {**_special("<unk>"), "normalized": False},
    }
    _write_json(folder / "special_tokens_map.json", specials)


def write_tokenizers(root: Path) -> None:
    """`root/tokenizer` (CLIP) and `root/tokenizer_2` (T5), the FLUX.1 snapshot's folder names."""
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
