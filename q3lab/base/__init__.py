"""Ground layer: bytes to validated values (safetensors headers, bounded JSON, the config, the tokenizer)."""
