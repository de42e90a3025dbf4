"""Placeholder: replaced by the tokenizer work."""


class Tokenizer:
    def __init__(self, checkpoint_dir):
        raise NotImplementedError
