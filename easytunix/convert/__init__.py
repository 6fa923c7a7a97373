"""Conversion of external checkpoint formats (e.g. GGUF) into Hugging Face folders."""
