"""The Llama-3-8B shape the GPU benchmarks build with random weights (nothing is downloaded): its command-line
flags, so a smaller shape can be asked for on a CPU, and its transformers config."""

from __future__ import annotations

import argparse


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and the model shape; the defaults are Llama-3-8B (8.0 B parameters, untied embeddings)."""
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)


def llama_config(args: argparse.Namespace, **extra):
    """A LlamaConfig of that shape with Llama-3's RoPE base; extra: further config fields."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, **extra,
    )
