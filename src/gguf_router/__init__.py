"""gguf-router: one OpenAI-compatible port in front of a llama-server per model."""

__version__ = "0.1.0"
