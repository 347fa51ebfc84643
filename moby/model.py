"""MoBY: MoCo-style queues + BYOL-style predictor and momentum target (upstream models/moby.py).

Online branch: encoder -> projector -> predictor. Target branch: encoder_k -> projector_k, an
exponential moving average of the online encoder and projector (no predictor). Each view's
prediction is contrasted against the other view's target key, with a queue of past keys of that
view as negatives; the symmetric loss is CL(pred1, key2, queue2) + CL(pred2, key1, queue1).

The state-dict layout (encoder., encoder_k., projector., projector_k., predictor., queue1,
queue2, queue_ptr) is upstream's, so official MoBY checkpoints load into this module.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from ssl_runtime.device import compile_module
from ssl_runtime.distributed import all_gather_cat
from ssl_runtime.ema import ema_update_
from ssl_runtime.errors import UserError
from ssl_runtime.schedules import cosine_momentum

from .backbones import build_encoder

KEY_DIM = 256  # output size of projector and predictor (upstream's MoBYMLP out_dim)


class MoBYMLP(nn.Module):
    """(Linear-BN-ReLU) x (num_layers - 1), then Linear to out_dim.

    Submodule names match upstream (linear_hidden.0 is an Identity, then triples), so
    checkpoint keys such as projector.linear_hidden.1.weight line up.
    """

    def __init__(self, in_dim: int = KEY_DIM, inner_dim: int = 4096, out_dim: int = KEY_DIM,
                 num_layers: int = 2):
        super().__init__()
        hidden: list[nn.Module] = [nn.Identity()]
        for i in range(num_layers - 1):
            hidden += [nn.Linear(in_dim if i == 0 else inner_dim, inner_dim),
                       nn.BatchNorm1d(inner_dim), nn.ReLU(inplace=True)]
        self.linear_hidden = nn.Sequential(*hidden)
        if num_layers >= 1:
            self.linear_out = nn.Linear(in_dim if num_layers == 1 else inner_dim, out_dim)
        else:
            self.linear_out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.linear_hidden(x))


class ContrastiveTerms(NamedTuple):
    """The InfoNCE loss and (ours, for watching collapse) its mean cosine similarities: the
    positive pair q.k+ over the N queries, the negatives q.k- over the N x K query-queue pairs."""

    loss: torch.Tensor
    positive_similarity: torch.Tensor
    negative_similarity: torch.Tensor


def contrastive_terms(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                      temperature: float) -> ContrastiveTerms:
    """InfoNCE with the positive at index 0: CE([q.k+, q.queue] / T, 0), and its similarities.

    query, key: (N, D), L2-normalised; queue: (D, K) of L2-normalised negatives.
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    # A copy: the queue is overwritten in place by the enqueue that follows in the same forward,
    # and autograd needs the values used here.
    negatives = query @ queue.detach().clone()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return ContrastiveTerms(F.cross_entropy(logits, labels), positive.detach().float().mean(),
                            negatives.detach().float().mean())


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    return contrastive_terms(query, key, queue, temperature).loss


class MoBY(nn.Module):
    def __init__(self, encoder: nn.Module, encoder_k: nn.Module, contrast_momentum: float = 0.99,
                 contrast_temperature: float = 0.2, contrast_num_negative: int = 4096,
                 proj_num_layers: int = 2, pred_num_layers: int = 2, total_steps: int = 1):
        super().__init__()
        self.encoder = encoder
        self.encoder_k = encoder_k
        self.contrast_momentum = contrast_momentum
        self.contrast_temperature = contrast_temperature
        self.contrast_num_negative = contrast_num_negative

        self.projector = MoBYMLP(in_dim=encoder.num_features, num_layers=proj_num_layers)
        self.projector_k = MoBYMLP(in_dim=encoder.num_features, num_layers=proj_num_layers)
        self.predictor = MoBYMLP(num_layers=pred_num_layers)

        for online, target in ((self.encoder, self.encoder_k), (self.projector, self.projector_k)):
            for p, p_k in zip(online.parameters(), target.parameters()):
                p_k.data.copy_(p.data)
                p_k.requires_grad = False  # the target follows by EMA only

        # Momentum schedule position: k steps done out of K = steps per epoch * epochs.
        self.total_steps = max(int(total_steps), 1)
        self.step = 0

        self.register_buffer("queue1", F.normalize(torch.randn(KEY_DIM, contrast_num_negative), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(KEY_DIM, contrast_num_negative), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Host copy of queue_ptr so that enqueuing never waits for the device; re-read after loading.
        self._ptr: int | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_ptr", None))
        self.signals: dict[str, torch.Tensor] = {}  # the last forward's, see similarity_signals

    # ---------------------------------------------------------------- target branch
    def momentum(self) -> float:
        return cosine_momentum(self.contrast_momentum, self.step, self.total_steps)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of encoder/projector into encoder_k/projector_k, then advance the schedule."""
        m = self.momentum()
        self.step += 1
        ema_update_(list(self.encoder_k.parameters()) + list(self.projector_k.parameters()),
                    list(self.encoder.parameters()) + list(self.projector.parameters()), m)


    # ---------------------------------------------------------------- queues
    @torch.no_grad()
    def dequeue_and_enqueue(self, keys1: torch.Tensor, keys2: torch.Tensor) -> None:
        """Write every rank's keys over the oldest queue entries; the pointer wraps around."""
        keys1, keys2 = all_gather_cat(keys1), all_gather_cat(keys2)
        batch = keys1.shape[0]
        if self.contrast_num_negative % batch:
            raise UserError(queue_size_message(self.contrast_num_negative, batch))
        if self._ptr is None:
            self._ptr = int(self.queue_ptr)
        ptr = self._ptr
        self.queue1[:, ptr:ptr + batch] = keys1.T
        self.queue2[:, ptr:ptr + batch] = keys2.T
        self._ptr = (ptr + batch) % self.contrast_num_negative
        self.queue_ptr.fill_(self._ptr)

    # ---------------------------------------------------------------- forward
    def forward(self, im_1: torch.Tensor, im_2: torch.Tensor) -> torch.Tensor:
        # One pass per view, as upstream: BatchNorm statistics (projector, predictor, the `_bn`
        # encoders) are per view. Both views in one encoder pass was measured slower on CPU
        # (Swin-T 224, batch 8: 0.76x instead of 0.94x upstream's speed), so it is not done.
        pred_1 = F.normalize(self.predictor(self.projector(self.encoder(im_1))), dim=1)
        pred_2 = F.normalize(self.predictor(self.projector(self.encoder(im_2))), dim=1)

        with torch.no_grad():
            self.momentum_update()  # before the target pass, as upstream
            key_1 = F.normalize(self.projector_k(self.encoder_k(im_1)), dim=1)
            key_2 = F.normalize(self.projector_k(self.encoder_k(im_2)), dim=1)

        terms = (contrastive_terms(pred_1, key_2, self.queue2, self.contrast_temperature),
                 contrastive_terms(pred_2, key_1, self.queue1, self.contrast_temperature))
        loss = terms[0].loss + terms[1].loss
        self.signals = similarity_signals(terms)

        self.dequeue_and_enqueue(key_1, key_2)
        return loss


def similarity_signals(terms: Sequence[ContrastiveTerms]) -> dict[str, torch.Tensor]:
    """(ours) MoBY's collapse signals, as 0-d device tensors averaged over the two directions:

    - `pos_sim`: mean cosine similarity of a view's prediction and the other view's target key;
    - `neg_sim`: mean cosine similarity of a prediction and the queue's keys of other images;
    - `sim_gap` = pos_sim - neg_sim, in [-2, 2]: the margin by which the positive logit exceeds
      the negative ones, in units of the temperature T: logits differ by sim_gap / T on average.

    A healthy run pulls pos_sim towards 1 and keeps neg_sim near 0 (keys spread over the sphere).
    Collapse, every image mapped to one point, makes the positive key and the queued keys alike:
    pos_sim = neg_sim, sim_gap 0, and the loss sits at ln(1 + K), the positive being no likelier
    than any of the K negatives.
    """
    positive = sum(t.positive_similarity for t in terms) / len(terms)
    negative = sum(t.negative_similarity for t in terms) / len(terms)
    return {"pos_sim": positive, "neg_sim": negative, "sim_gap": positive - negative}


def queue_size_message(queue_size: int, global_batch: int) -> str:
    return (f"MODEL.MOBY.CONTRAST_NUM_NEGATIVE ({queue_size}) must be a multiple of the global batch "
            f"size ({global_batch} = batch size per process x processes): change --batch-size, the "
            "number of processes, or the queue size with --opts MODEL.MOBY.CONTRAST_NUM_NEGATIVE N")


def check_queue_size(config: CfgNode, world_size: int) -> None:
    """Fail before training when the keys of one step would not tile the queue exactly."""
    global_batch = config.DATA.BATCH_SIZE * world_size
    if config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE % global_batch:
        raise UserError(queue_size_message(config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE, global_batch))


def build_moby(config: CfgNode, steps_per_epoch: int) -> MoBY:
    """Online and target encoders (their own drop-path rates) wrapped in MoBY."""
    moby = config.MODEL.MOBY
    encoder = build_encoder(config, num_classes=0, drop_path_rate=moby.ONLINE_DROP_PATH_RATE)
    encoder_k = build_encoder(config, num_classes=0, drop_path_rate=moby.TARGET_DROP_PATH_RATE)
    return MoBY(encoder, encoder_k,
                contrast_momentum=moby.CONTRAST_MOMENTUM,
                contrast_temperature=moby.CONTRAST_TEMPERATURE,
                contrast_num_negative=moby.CONTRAST_NUM_NEGATIVE,
                proj_num_layers=moby.PROJ_NUM_LAYERS,
                pred_num_layers=moby.PRED_NUM_LAYERS,
                total_steps=steps_per_epoch * config.TRAIN.EPOCHS)


def maybe_compile_encoders(config: CfgNode, moby: MoBY, device_type: str) -> None:
    """TRAIN.COMPILE / --compile: torch.compile both encoders in place (state-dict keys unchanged)."""
    if config.TRAIN.COMPILE:
        compile_module(moby.encoder, device_type)
        compile_module(moby.encoder_k, device_type)


def build_linear_classifier(config: CfgNode, drop_path_rate: float) -> nn.Module:
    """The encoder with a classification `head` (upstream MODEL.TYPE 'linear')."""
    return build_encoder(config, num_classes=config.MODEL.NUM_CLASSES, drop_path_rate=drop_path_rate)
