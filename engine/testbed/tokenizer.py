"""The testbed's tokenizer (tokenizers library): byte-level BPE that never merges digits (and, for
a task that asks, capital letters; the edges task adds one token per edge), ChatML special tokens
and chat template, and whole-word Yes / No for the self-evaluation answer."""

from __future__ import annotations

from engine.selfeval import QUESTION
from engine.testing.make_model import CHAT_TEMPLATE, SPECIAL_TOKENS


def make_tokenizer(vocab_size: int = 320, task: str = "arith"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.testbed import load_task

    spec = load_task(task)
    tok = Tokenizer(models.BPE())
    split = [pre_tokenizers.Split(Regex("[A-Z]"), behavior="isolated")] if spec.SPLIT_LETTERS else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [
        pre_tokenizers.Digits(individual_digits=True),  # arithmetic sees one digit per token
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [p.question + "\n" + p.solution for p in spec.problems(2000, seed=12345)]
    corpus += [QUESTION, "Yes. No.", "user assistant"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens(list(getattr(spec, "EDGE_TOKENS", ())))  # a task that wants one token per edge
    tok.add_tokens(["Yes", "No"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
