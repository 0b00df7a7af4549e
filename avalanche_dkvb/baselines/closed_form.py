"""The training loop shared by the closed-form baselines: one pass absorbing each minibatch."""

from __future__ import annotations

import torch
from avalanche.training.templates import SupervisedTemplate


class ClosedFormStrategy(SupervisedTemplate):
    """A strategy without optimizer whose model absorbs data with ``model.update(x, y)``.

    Only the first epoch of an experience absorbs data (the fit does not depend on ``train_epochs``);
    the minibatch is absorbed between ``before_update`` and ``after_update`` after the output for the
    training metrics was computed, as in Avalanche's ``StreamingLDA``. ``model.fit()``, if the model
    has one, runs once after the pass.
    """

    def make_optimizer(self, **kwargs):
        """No optimizer: the model is fitted in closed form."""

    @torch.no_grad()
    def training_epoch(self, **kwargs):
        self.model.eval()
        absorb = self.clock.train_exp_epochs == 0
        for self.mbatch in self.dataloader:
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_update(**kwargs)
            if absorb:
                self.model.update(self.mb_x, self.mb_y)
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)
        if absorb and hasattr(self.model, "fit"):
            self.model.fit()
