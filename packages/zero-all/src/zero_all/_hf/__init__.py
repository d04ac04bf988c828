"""The Hugging Face path: Transformers' Trainer and Accelerate reach zero where they would reach DeepSpeed.

:mod:`._alias` answers ``import deepspeed`` (and its distribution metadata) with zero_all, and
:mod:`._install` is ``zero hf enable|disable|status``, the explicit opt-in. Neither imports transformers or
accelerate: what they call on ``deepspeed.*`` is zero_all's DeepSpeed-named surface. See docs/huggingface.md.
"""
