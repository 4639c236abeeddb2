"""Ground layer: bytes to validated values. Imports nothing of q3lab but `q3lab.errors`.

`config` (ThinkerConfig from any of the three config.json shapes), `safetensors_io` (strict headers, positioned
reads), `jsonio` (the one bounded JSON/text reader), `tokenizer` (load_tokenizer, train_bpe).
"""
