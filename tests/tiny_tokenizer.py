"""A small byte-level BPE tokenizer trained in memory (no download), with BOS/EOS/PAD specials.

It adds a BOS in front of every text (like Llama-2), so tests exercise BOS handling too.
"""

from __future__ import annotations

import functools

CORPUS = [
    "Question: Which is a fruit? Answer: apple", "Answer: A", "Answer: B", "Answer: C", "Answer: D", "Answer: E",
    " (A) (B) (C) (D) (E)", "Below is an instruction that describes a task.", "### Instruction: ### Response:",
    "the cat sat on the mat. a dog ran in the park. yes no true false red green blue",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` of about 400 tokens; ' A'...' E' are single tokens after 'Answer:'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
