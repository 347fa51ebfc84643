"""DINO (facebookresearch/dino) on the shared ssl_runtime: pretraining, k-NN / linear evaluation and
attention maps. Entry points: dino/main_dino.py, dino/eval_knn.py, dino/eval_linear.py,
dino/visualize_attention.py."""
