"""Counted nouns for messages: '1 shard', '3 shards'."""


def plural(n: int, word: str, words: str | None = None) -> str:
    """``n`` and the noun in the right number (``words`` gives an irregular plural)."""
    return f"{n} {word if n == 1 else words or word + 's'}"
