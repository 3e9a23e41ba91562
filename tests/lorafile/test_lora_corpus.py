"""The convention corpus (tests/helpers/lora_corpus.py) against the tiny preset's layout, without weights:
every file is recognised and applies every key; the control LoRA is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.lora_corpus import CONVENTIONS, build_corpus

from client.lorafile.inspect import inspect_lora
from client.lorafile.layout import PRESET_SHAPES, norm_layout, preset_layout
from client.wire.errors import LoraUnsupported


@pytest.fixture(scope="module")
def layout():
    return preset_layout("tiny") | norm_layout(PRESET_SHAPES["tiny"])  # Linear layers and RMSNorms


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, layout):
    return build_corpus(tmp_path_factory.mktemp("corpus"), layout)


def test_corpus_has_30_conventions_each_citing_its_source(corpus):
    applied = [f for f in corpus.values() if f.expect == "apply"]
    assert len(CONVENTIONS) >= 30 and len(applied) >= 30
    assert all(len(f.source) > 20 for f in corpus.values())
    dtypes = {dtype for _, dtype, _, _ in CONVENTIONS.values()}
    assert {"BF16", "F16", "F32"} <= dtypes


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_every_corpus_file_applies_all_its_keys(corpus, layout, name):
    entry = corpus[name]
    report = inspect_lora(entry.path, layout=layout)
    assert report.leftover == [], report.leftover[:3]
    assert report.keys_applied == report.keys_total == len(entry.keys)
    assert set(report.patched_layers) == set(entry.targets)
    assert report.explanation is None


def test_control_lora_is_refused_saying_what_it_is(corpus, layout):
    with pytest.raises(LoraUnsupported, match="FLUX.1 control LoRA") as err:
        inspect_lora(corpus["bfl_control"].path, layout=layout)
    assert "control image" in err.value.message and err.value.details["kind"] == "flux1_control"
    with pytest.raises(LoraUnsupported, match="control"):  # also without a model: the name alone decides
        inspect_lora(corpus["bfl_control"].path)


DOC = Path(__file__).resolve().parents[2] / "docs" / "lora_formats.md"


def test_doc_tables_match_the_keymaps_and_the_corpus(corpus):
    from helpers.lora_corpus import CORPUS_BEGIN, CORPUS_END, markdown_table

    from client.lorafile.doc_tables import rewrite

    text = DOC.read_text(encoding="utf-8")
    assert rewrite(DOC) == text, "docs/lora_formats.md is stale: python -m client.lorafile.doc_tables"
    section = CORPUS_BEGIN + text.partition(CORPUS_BEGIN)[2].partition(CORPUS_END)[0] + CORPUS_END
    assert section == markdown_table(corpus), "corpus table is stale: python tests/helpers/lora_corpus.py"
