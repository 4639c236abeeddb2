"""The Omni in the thinker: audio and vision towers from the checkpoint, multimodal inputs with transformers'
argument names, and the positions (3-axis mRoPE, audio-in-video interleaving) transformers' thinker computes.

Needs the `omni` extra (transformers: the towers are its own modules, filled through q3lab's reader). The text
path never imports this package.
"""
