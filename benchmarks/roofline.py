"""The limit a card sets: FLOPs per token from a model's config, bf16 peak and memory bandwidth
from a small table of cards, and what fraction of it a measured part reached.

A part's roofline time is the larger of its compute time at peak (tokens x FLOPs per token) and,
for decoding, the time to read every weight once per step at full bandwidth (a decoding step
reads all of them whatever its batch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak (no sparsity), from the vendor's data sheet."""
    memory_gbs: float
    """Memory bandwidth, GB/s."""


CARDS = (  # the first whose key is in torch.cuda.get_device_name() wins: PCIe before SXM
    Card("H100 PCIe", 756.0, 2000.0),
    Card("H100", 989.0, 3350.0),
    Card("H200", 989.0, 4800.0),
    Card("A100", 312.0, 2039.0),
    Card("L40S", 362.0, 864.0),
    Card("L4", 121.0, 300.0),
)


def find_card(device_name: str) -> Card | None:
    return next((card for card in CARDS if card.name in device_name), None)


def flops_per_token(config, context: int = 0) -> float:
    """Forward FLOPs of one token: 2 per weight of every matmul (attention projections, MLP, LM
    head), plus attention scores and their weighted sum over `context` earlier tokens."""
    config = config.get_text_config()
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o; k and v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    matmul_weights = layers * (attention + mlp) + hidden * config.vocab_size
    return 2.0 * matmul_weights + 4.0 * layers * heads * head_dim * context


@dataclass(frozen=True)
class Work:
    """What a part computed: tokens through the model and decoding steps."""

    tokens: int
    decode_steps: int = 0
    context: int = 0
    """Mean tokens attended to, for the attention FLOPs."""


def roofline_seconds(card: Card, config, weight_bytes: int, work: Work) -> float:
    compute = work.tokens * flops_per_token(config, work.context) / (card.bf16_tflops * 1e12)
    weights = work.decode_steps * weight_bytes / (card.memory_gbs * 1e9)
    return max(compute, weights)


def roofline_line(card: Card, config, weight_bytes: int, name: str, seconds: float, work: Work) -> str:
    """One table row: the part's tokens/s, the roofline's, and the fraction reached."""
    limit = roofline_seconds(card, config, weight_bytes, work)
    bound = "weight reads" if work.decode_steps * weight_bytes / (card.memory_gbs * 1e9) >= limit else "compute"
    return (f"| {name} | {work.tokens} | {work.tokens / seconds:,.0f} | {work.tokens / limit:,.0f} | {bound} | "
            f"{limit / seconds:.1%} |")
