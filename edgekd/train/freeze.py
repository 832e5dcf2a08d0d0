"""Fine-tuning from pretrained weights: the backbone is frozen for the first epochs while the new head learns
(`freeze_backbone_epochs` of the training settings).

Frozen means: the backbone's gradients are dropped after each backward pass (set to None, so the optimizer leaves
those weights alone, weight decay and momentum included) and its BatchNorm layers run in eval mode (their running
statistics stay the pretrained ones). Gradients are dropped rather than `requires_grad` switched off, so the same
code works under DistributedDataParallel, whose gradient hooks are fixed when the model is wrapped.
"""

from __future__ import annotations

from torch import nn


class BackboneFreeze:
    """Freezes everything but the classifier head (`models.classifier_name`) for `epochs` epochs."""

    def __init__(self, model: nn.Module, epochs: int) -> None:
        from edgekd.models.heads import classifier_name

        self.epochs = epochs
        head = classifier_name(model) if epochs else None
        head_module = model.get_submodule(head) if head else None
        head_params = {id(p) for p in head_module.parameters()} if head_module is not None else set()
        head_modules = {id(m) for m in head_module.modules()} if head_module is not None else set()
        self.backbone = [p for p in model.parameters() if id(p) not in head_params]
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_modules]
        self.frozen = False

    def start_epoch(self, epoch: int) -> bool:
        """Call after `model.train()` at the start of each epoch (1-based); True while the backbone is frozen."""
        self.frozen = epoch <= self.epochs
        if self.frozen:
            for norm in self.norms:
                norm.eval()
        return self.frozen

    def drop_backbone_grads(self) -> None:
        """Call after backward, before the optimizer step: no update reaches a frozen backbone."""
        if self.frozen:
            for parameter in self.backbone:
                parameter.grad = None
