"""MoBY (Swin / DeiT) self-supervised pre-training, linear and k-NN evaluation."""

import ssl_runtime  # noqa: F401,E402 - stops at once, with one clear line, on a torch older than the code needs
