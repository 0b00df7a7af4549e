"""Methods for the real-image benchmarks, by name, each an Avalanche strategy on cached embeddings.

Defaults (``MethodSettings``): SGD-trained baselines follow the authors' baseline protocol (SGD lr
1e-3, batch 256, gradient-norm clip 1.0, label smoothing 0.1, the same epochs as DKVB) on a linear
probe over the embeddings; the MLP has one hidden layer of 128. Regularisation strengths default to
Avalanche's usual, untuned values (EWC lambda 100, LwF alpha 1 / temperature 2, SI lambda 1); the
CLI sets them with --ewc-lambda, --lwf-alpha and --si-lambda. SI is Avalanche's with its parameter
snapshots copied (Avalanche's own SI equals Naive on a CPU; see
``avalanche_dkvb.baselines.synaptic_intelligence``). Replay and GDumb keep ``memory`` samples.
Streaming LDA, nearest class mean and random projection + ridge are closed form (one pass).
``joint`` is Avalanche's Cumulative (all data seen so far). DKVB uses the paper's defaults (C 256,
K 4096, d_key 14, SGD lr 0.3, keys by EMA on a different data set's embeddings); ``dkvb_counts`` fills
the same model's values from per-key class counts, ``dkvb_moments`` adds per-(key, class) head means at
C 1024, K 256 (``avalanche_dkvb.CountValues`` / ``MomentValues``), ``dkvb_moments_d64`` at C 256, K 256 with
64-dimensional keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import EWC, GDumb, LwF, Naive, Cumulative
from torch import nn

from avalanche_dkvb import DKVB, CountValues, MomentValues, create_dkvb_model
from avalanche_dkvb.baselines import CopyingSynapticIntelligence, NearestClassMean, RandomProjectionRidge
from avalanche_dkvb.in_memory_batches import InMemoryBatchesPlugin, InMemoryReplayPlugin
from avalanche_dkvb.validation import check_non_negative_float, check_positive_float, check_positive_int


@dataclass
class MethodSettings:
    """Everything a method factory needs; one instance per (benchmark, seed)."""

    input_dim: int
    num_classes: int
    key_init_data: torch.Tensor  # (N, D) unlabelled embeddings of a different data set
    epochs: int = 2000  # per experience, SGD-trained methods including DKVB
    baseline_epochs: int | None = None  # per experience, the SGD baselines (SGD_BASELINES); None: ``epochs``
    key_init_epochs: int = 10
    baseline_lr: float = 1e-3
    memory: int = 2000
    ewc_lambda: float = 100.0
    lwf_alpha: float = 1.0
    si_lambda: float = 1.0
    ridge_projection: int = 5000
    device: str = "cpu"

    def __post_init__(self) -> None:
        """ValueError/TypeError naming the first unusable setting, before any strategy is built."""
        for name in ("input_dim", "num_classes", "epochs", "key_init_epochs", "memory", "ridge_projection"):
            check_positive_int(name, getattr(self, name))
        if self.baseline_epochs is not None:
            check_positive_int("baseline_epochs", self.baseline_epochs)
        check_positive_float("baseline_lr", self.baseline_lr)
        for name in ("ewc_lambda", "lwf_alpha", "si_lambda"):
            check_non_negative_float(name, getattr(self, name))


class GradientClipPlugin(SupervisedPlugin):
    """Clips the global gradient norm before every optimizer step."""

    checkpoint_stateless = True  # nothing to save between experiences (avalanche_dkvb.checkpoint)

    def __init__(self, max_norm: float = 1.0):
        super().__init__()
        self.max_norm = max_norm

    def before_update(self, strategy, **kwargs):
        torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), self.max_norm)


def _linear(s: MethodSettings) -> nn.Module:
    return nn.Linear(s.input_dim, s.num_classes)


def _mlp(s: MethodSettings) -> nn.Module:
    return nn.Sequential(nn.Linear(s.input_dim, 128), nn.ReLU(), nn.Linear(128, s.num_classes))


def _sgd(strategy_cls, model: nn.Module, s: MethodSettings, evaluator, loader: SupervisedPlugin | None = None,
         **kwargs):
    """An SGD-trained Avalanche strategy with the baseline protocol; ``loader`` builds its minibatches from
    in-memory tensors (default ``InMemoryBatchesPlugin``)."""
    plugins = [GradientClipPlugin(1.0), loader or InMemoryBatchesPlugin()]
    epochs = s.epochs if s.baseline_epochs is None else s.baseline_epochs
    return strategy_cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=s.baseline_lr),
                        criterion=nn.CrossEntropyLoss(label_smoothing=0.1), train_mb_size=256,
                        train_epochs=epochs, eval_mb_size=1024, device=s.device, plugins=plugins,
                        evaluator=evaluator, **kwargs)


def _dkvb(s: MethodSettings, evaluator):
    return DKVB(model=create_dkvb_model(s.input_dim, s.num_classes), train_epochs=s.epochs, device=s.device,
                evaluator=evaluator, init_data=s.key_init_data,
                key_init_kwargs={"epochs": s.key_init_epochs}, fast_path_threads=1)


def _dkvb_counts(s: MethodSettings, evaluator):
    """DKVB's model and keys, values from per-key class counts (one pass; ``epochs`` does not apply)."""
    return CountValues(model=create_dkvb_model(s.input_dim, s.num_classes), device=s.device, evaluator=evaluator,
                       init_data=s.key_init_data, key_init_kwargs={"epochs": s.key_init_epochs})


def _dkvb_moments(s: MethodSettings, evaluator):
    """Count values plus per-(key, class) head means (MomentValues), C 1024 codebooks of K 256 keys."""
    model = create_dkvb_model(s.input_dim, s.num_classes, num_codebooks=1024, num_keys=256)
    return MomentValues(model=model, device=s.device,
                        evaluator=evaluator, init_data=s.key_init_data,
                        key_init_kwargs={"epochs": s.key_init_epochs})


def _dkvb_moments_d64(s: MethodSettings, evaluator):
    """MomentValues with 64-dimensional keys: C 256 codebooks of K 256 keys, d_key 64 (larger cells model
    more of each head; the ablation's best moment setting)."""
    model = create_dkvb_model(s.input_dim, s.num_classes, num_codebooks=256, num_keys=256, key_dim=64)
    return MomentValues(model=model, device=s.device, evaluator=evaluator, init_data=s.key_init_data,
                        key_init_kwargs={"epochs": s.key_init_epochs})


def _slda(s: MethodSettings, evaluator):
    from avalanche_dkvb.baselines import BatchedStreamingLDA
    return BatchedStreamingLDA(input_size=s.input_dim, num_classes=s.num_classes, device=s.device,
                               evaluator=evaluator)


SGD_METHODS = {
    "linear": lambda s, ev: _sgd(Naive, _linear(s), s, ev),
    "mlp": lambda s, ev: _sgd(Naive, _mlp(s), s, ev),
    "ewc": lambda s, ev: _sgd(EWC, _linear(s), s, ev, ewc_lambda=s.ewc_lambda),
    "lwf": lambda s, ev: _sgd(LwF, _linear(s), s, ev, alpha=s.lwf_alpha, temperature=2.0),
    "si": lambda s, ev: _sgd(CopyingSynapticIntelligence, _linear(s), s, ev, si_lambda=s.si_lambda),
    # Avalanche's Replay strategy is Naive with a ReplayPlugin; this one slices the same minibatches from tensors
    "replay": lambda s, ev: _sgd(Naive, _linear(s), s, ev, loader=InMemoryReplayPlugin(mem_size=s.memory)),
    "gdumb": lambda s, ev: _sgd(GDumb, _linear(s), s, ev, mem_size=s.memory),
    "joint": lambda s, ev: _sgd(Cumulative, _linear(s), s, ev),
}
"""The baselines trained by ``_sgd`` (the authors' baseline protocol): ``baseline_epochs`` applies to them."""

METHODS = {
    "dkvb": _dkvb,
    "dkvb_counts": _dkvb_counts,
    "dkvb_moments": _dkvb_moments,
    "dkvb_moments_d64": _dkvb_moments_d64,
    **SGD_METHODS,
    "slda": _slda,
    "ncm": lambda s, ev: NearestClassMean(in_features=s.input_dim, num_classes=s.num_classes,
                                          device=s.device, evaluator=ev),
    "ridge": lambda s, ev: RandomProjectionRidge(in_features=s.input_dim, num_classes=s.num_classes,
                                                 projection_dim=s.ridge_projection, device=s.device, evaluator=ev),
}

SGD_BASELINES = frozenset(SGD_METHODS)
