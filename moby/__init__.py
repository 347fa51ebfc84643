"""MoBY (Swin / DeiT) self-supervised pre-training, linear and k-NN evaluation."""
