"""Checkpoint readers: Hugging Face folders (safetensors) and GGUF files."""
