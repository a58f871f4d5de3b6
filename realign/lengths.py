"""Counting the length of texts: in a tokenizer's tokens when one is given, else in words.

reformat.py keeps the longest candidate and rewrite_data_selection.py compares lengths;
both count the same way. Tokenizers are called in batches: one call per text is the
slow path the original took.
"""

import logging

logger = logging.getLogger(__name__)


def count_words(texts):
    return [len(text.split()) for text in texts]


class LengthCounter:
    """``counter(texts) -> list[int]``; ``counter.unit`` is ``"tokens"`` or ``"words"``."""

    def __init__(self, tokenizer_path=None, batch_size=1024):
        self.batch_size = batch_size
        self._tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            self.unit = "tokens"
        else:
            self.unit = "words"
            logger.info("no --tokenizer_path given: lengths are counted in words")

    def __call__(self, texts):
        texts = list(texts)
        if self._tokenizer is None:
            return count_words(texts)
        counts = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            encoded = self._tokenizer(batch, add_special_tokens=False)["input_ids"]
            counts.extend(len(ids) for ids in encoded)
        return counts
