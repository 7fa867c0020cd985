"""Write a random-initialised Gemma-2-2B folder that `harness run` can load as a local model.

The reference workload runs Gemma-2-2B on a GPU; this gives its exact shape without the hub:
google/gemma-2-2b's config.json values written out, random weights (`save_pretrained`), and a
word-level tokenizer of the same vocabulary size (Gemma's pad, eos, bos and unk ids 0-3, then
the most frequent words of `--words-from`, by default the WikiText-2 test split shipped with the
package, then filler words). `benchmarks/
random-gemma2-2b.yaml` points `models.base.id` at the default output folder.

    python benchmarks/make_random_gemma2.py                     # benchmarks/random-gemma2-2b, bf16 (~5 GB)
    python benchmarks/make_random_gemma2.py --tiny OUT          # 2 layers, small width: a CPU check in seconds
    python benchmarks/make_random_gemma2.py --words-from my-corpus.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, Gemma2Config, PreTrainedTokenizerFast

from harness.data_sources import packaged_rows

DEFAULT_FOLDER = Path(__file__).resolve().parent / "random-gemma2-2b"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
"""Gemma's ids 0-3."""


def gemma_2_2b_config() -> Gemma2Config:
    """google/gemma-2-2b's config.json values, written out so no hub access is needed."""
    return Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096, max_position_embeddings=8192, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def tiny_config() -> Gemma2Config:
    """Gemma 2's architecture (softcapping, sliding window) at a size that runs in seconds on a CPU."""
    return Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0, sliding_window=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def word_tokenizer(vocab_size: int, words_from: Path | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab_size` tokens that prepends BOS, as Gemma's does.

    Words (and runs of punctuation) are tokens: the most frequent of `words_from` (default: the
    packaged WikiText-2 test split), then "w<i>" fillers. Decoding joins tokens with spaces, so
    generated text encodes back to the same ids.
    """
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(SPECIAL_TOKENS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    if words_from is not None:
        tokenizer.train([str(words_from)], trainer)
    else:
        tokenizer.train_from_iterator(packaged_rows("make_random_gemma2"), trainer)
    vocab = tokenizer.get_vocab()
    fillers = (f"w{i}" for i in range(vocab_size) if f"w{i}" not in vocab)
    vocab |= {next(fillers): index for index in range(len(vocab), vocab_size)}
    tokenizer.model = models.WordLevel(vocab, unk_token="<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def random_model(config: Gemma2Config, dtype: torch.dtype, device: torch.device):
    """A causal LM with random weights, initialised on `device` (seconds on a GPU for 2.6B parameters)."""
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def write_folder(folder: Path, config: Gemma2Config, dtype: torch.dtype, device: torch.device, words_from: Path | None) -> None:
    tokenizer = word_tokenizer(config.vocab_size, words_from)
    random_model(config, dtype, device).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--tiny", action="store_true", help="2 layers, small width: checks the pipeline in seconds")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to initialise")
    parser.add_argument("--words-from", type=Path, help="a text file whose most frequent words become tokens "
                        "(default: the packaged WikiText-2 test split)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = tiny_config() if args.tiny else gemma_2_2b_config()
    write_folder(args.folder, config, getattr(torch, args.dtype), torch.device(args.device), args.words_from)
    print(f"wrote {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
