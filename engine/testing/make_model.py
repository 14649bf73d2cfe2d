"""Write a small random checkpoint with a working tokenizer and chat template.

    python -m engine.testing.make_model DIR --arch llama|qwen2|qwen3

Weights come from transformers' own initialisation, so the directory is also the oracle model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    'Would you do better if you started over? ("Yes." or "No.")',
    "Yes. No. yes no Yes No",
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Q: 347*86 = ? Step 1: 347*80 = 27760. Step 2: 347*6 = 2082. #### 29842",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) ? ! . , : ; # user assistant system",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
]


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (tokenizers library) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def hf_config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=3, pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
        return Qwen3Config(**common)
    raise ValueError(f"unknown arch {arch!r}: choose llama, qwen2 or qwen3")


def make_model(out: str | Path, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None,
               **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = hf_config(arch, overrides.pop("vocab_size", len(tokenizer)), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Wider than the default init so that random logits are not all near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    tokenizer.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="directory to write")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_model(args.out, arch=args.arch, seed=args.seed)
    print(f"wrote a random {args.arch} checkpoint to {path}")


if __name__ == "__main__":
    main()
