"""Losses: contrastive (InfoNCE, GradCache) and token losses over the vocabulary."""
