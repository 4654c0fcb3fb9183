"""Sub-commands that run or measure built models (verify, perplexity, run, chat)."""
from __future__ import annotations


def add_commands(sub) -> None:
    """Register the measurement sub-commands on the main parser."""
    return None
