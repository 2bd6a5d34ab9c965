"""Omni composition: merged text/vision-language/speech backbones with their frozen towers (issue 14)."""
