"""modelprobe: claims about a language model's internals, run as pytest tests."""

__version__ = "0.1.0"
