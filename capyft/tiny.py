"""A tiny random Llama for tests and quick CPU trials (2 layers, hidden 64: 4-bit needs multiples of 64)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def make_tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """Saves a random-weight Llama with the given tokenizer (and its chat template) to ``out_dir``.

    Args:
        out_dir: where the HF model folder goes.
        tokenizer_dir: a tokenizer with a chat template (e.g. the SmolLM2 one from ``capyft.assets``).
        seed: weight-init seed.
        layers: decoder layers.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,  # wider than 0.02 so logits can move far enough for toy tasks to be learnable
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=make_tiny_llama.__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the SmolLM2 asset)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from capyft.assets import smollm2_dir

        args.tokenizer = smollm2_dir()
    print(make_tiny_llama(args.out_dir, args.tokenizer))


if __name__ == "__main__":
    main()
