"""Loading base models (the embedded GGUF, a folder, a cached hub id) and LoRA adapters."""
