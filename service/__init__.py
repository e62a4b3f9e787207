"""promptserve: serve prompt-tuned zero-shot inference over one frozen backbone."""

__version__ = "0.1.0"
