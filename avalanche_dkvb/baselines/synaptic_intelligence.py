"""Synaptic Intelligence that also works on a CPU.

Avalanche 0.6's ``SynapticIntelligencePlugin`` snapshots parameters with
``param.detach().cpu().flatten()``. On a GPU ``.cpu()`` copies; on a CPU it returns the parameter
itself, so the flattened snapshot is a *view* that moves with every update. Each step's parameter
change then reads as zero, every importance stays exactly zero, the penalty anchor follows the
weights, and SI trains exactly like Naive, whatever ``si_lambda`` is (the symptom reported in
ContinualAI/continual-learning-baselines issue 74). This subclass clones the two snapshots that must
outlive an update, right after Avalanche takes them; everything else is Avalanche's SI unchanged.
"""

from __future__ import annotations

from avalanche.training.plugins import SynapticIntelligencePlugin
from avalanche.training.templates import SupervisedTemplate


def _own_copies(snapshots: dict) -> None:
    """Replace each ``ParamData`` tensor by a copy, so it no longer aliases a live parameter."""
    for snapshot in snapshots.values():
        snapshot.data = snapshot.data.clone()


class CopyingSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """Avalanche's SI plugin with its parameter snapshots copied (see the module docstring)."""

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _own_copies(self.ewc_data[0])  # parameters at the start of the experience: the penalty's anchor

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _own_copies(self.syn_data["old_theta"])  # parameters before this step's update


class CopyingSynapticIntelligence(SupervisedTemplate):
    """Avalanche's ``SynapticIntelligence`` strategy with :class:`CopyingSynapticIntelligencePlugin`."""

    def __init__(self, *, si_lambda, eps: float = 1e-7, plugins=None, **kwargs):
        plugins = [*(plugins or []), CopyingSynapticIntelligencePlugin(si_lambda=si_lambda, eps=eps)]
        super().__init__(plugins=plugins, **kwargs)
