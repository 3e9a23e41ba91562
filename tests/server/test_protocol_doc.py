"""docs/protocol.md as an executable contract: every example exchange in it, run against a real
`easel serve --preset tiny --no-warmup` on its socket (tests/helpers/protocol_doc.py reads the blocks).

A change of the wire that the document does not show fails here, and so does a document that promises
what the daemon does not do. The examples run in document order on one daemon; the `last` one stops it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.protocol_doc import make_doc_loras, parse_examples, run_example
from helpers.serve_process import ServeProcess

pytestmark = pytest.mark.model

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
EXAMPLES = parse_examples(DOC.read_text())


@pytest.fixture(scope="module")
def doc_daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol-doc")
    make_doc_loras(root / "loras")
    d = ServeProcess(root, "--preset", "tiny", "--no-warmup", lora_root=root / "loras").start()
    d.env: dict = {}  # values captured by one example for later ones
    yield d
    d.kill()


def test_warm_is_false_until_the_first_render_without_warmup(doc_daemon):
    with doc_daemon.client() as c:
        assert c.status().warm is False  # --no-warmup: nothing has run on the model yet
        assert c.hello is not None and c.hello.protocol == c.status().protocol == 2


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not e.last], ids=lambda e: f"line{e.lineno}")
def test_example(doc_daemon, example):
    run_example(doc_daemon.socket, example, doc_daemon.env)


def test_warm_after_a_render(doc_daemon):
    with doc_daemon.client() as c:
        assert c.status().warm is True and c.status().renders_done > 0


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.last], ids=lambda e: f"line{e.lineno}")
def test_last_example(doc_daemon, example):
    run_example(doc_daemon.socket, example, doc_daemon.env)
    assert doc_daemon.proc.wait(60) == 0  # the shutdown example stops the daemon cleanly
