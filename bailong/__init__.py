"""bailong: make an English-dominant Llama-style model good at Traditional Chinese, cheaply."""

__version__ = "0.1.0"
