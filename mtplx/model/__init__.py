"""The trunk (mlx-lm's Qwen3.5 model) and the MTP head, composed into one :class:`MTPModel`."""
