"""DINO (facebookresearch/dino) on the shared ssl_runtime: pretraining, k-NN / linear evaluation and
attention maps. Entry points: dino/main_dino.py, dino/eval_knn.py, dino/eval_linear.py,
dino/visualize_attention.py."""

import ssl_runtime  # noqa: F401,E402 - stops at once, with one clear line, on a torch older than the code needs
