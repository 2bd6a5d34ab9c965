"""Models: plain functions and modules of HF models (encoder, pooling, omni, merging)."""
