"""The backbone layer: loading an HF decoder, attention modes, varlen kernels, trainable groups."""
