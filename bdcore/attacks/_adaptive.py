"""What the two adaptive attacks of Qi et al. share: cover samples and seeded per-sample triggers.

Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023. Besides the poison samples (trigger + target label), the attacks add *cover*
(regularisation) samples: other training samples that carry a training trigger but keep their true
label. They stop the model from leaning on any single trigger variant, so poison samples no longer
form their own cluster in latent space, which latent-separation defenses (AC, spectral signatures,
SCAn, SPECTRE) rely on.

The training trigger varies per sample (random masked pieces, or one of k patches). Those choices
come from a torch.Generator seeded from the config's seed and drawn in index order, never from the
global RNG, so an attack rebuilt from its config and state tensors poisons identically.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from pydantic import Field

from bdcore.attacks.base import Attack, AttackConfig, PoisonedTrainSet
from bdcore.data.base import ImageSet

# Offset of the per-sample trigger stream from the index draw: both come from config.seed, but
# the trigger choices should not be the same random numbers as the poison/cover permutation.
_TRIGGER_STREAM = 0x5EED


class AdaptiveConfig(AttackConfig):
    """`ratio` = poison samples / all training samples (dirty-label, drawn from all classes);
    `cover_ratio` = cover samples / all training samples, drawn from the samples not poisoned."""

    cover_ratio: float = Field(0.003, ge=0, le=1)


class AdaptiveAttack(Attack):
    """Base of adap_blend and adap_patch: poison + cover samples with a per-sample training trigger.

    Subclasses implement `apply_trigger` (the test-time trigger) and `_train_trigger(images,
    generator)` (the training-time one, drawing its per-sample choices from `generator`)."""

    config: AdaptiveConfig

    @abstractmethod
    def _train_trigger(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training trigger for each image, its random choices drawn from `generator` in order."""

    def trigger_generator(self) -> torch.Generator:
        """A fresh CPU generator for the per-sample trigger choices (same seed -> same choices)."""
        return torch.Generator().manual_seed(self.config.seed + _TRIGGER_STREAM)

    def apply_train_trigger(self, images, labels):
        """The training trigger on a batch, choices drawn from a fresh seeded generator (so the same
        batch always gets the same triggers). poison_train draws one stream for poison then cover."""
        return self._train_trigger(images, self.trigger_generator())

    def cover_count(self, n_train: int) -> int:
        if self.config.cover_ratio == 0:
            return 0
        return max(1, round(self.config.cover_ratio * n_train))

    def select_poison_and_cover(self, train: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """One seeded permutation of all samples: its first `poison_count` are poisoned (the same
        samples base Attack.select_poison_indices draws), the next `cover_count` are cover samples.
        Both sorted."""
        n = len(train.labels)
        n_poison, n_cover = self.poison_count(n), self.cover_count(n)
        if n_poison + n_cover > n:
            raise ValueError(f"{self.name}: ratio {self.config.ratio} + cover_ratio {self.config.cover_ratio} need "
                             f"{n_poison} poison + {n_cover} cover samples but the training set has only {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed))
        return order[:n_poison].sort().values, order[n_poison : n_poison + n_cover].sort().values

    def select_poison_indices(self, train: ImageSet) -> torch.Tensor:
        return self.select_poison_and_cover(train)[0]

    def poison_train(self, train: ImageSet) -> PoisonedTrainSet:
        """Poison samples: training trigger + target label. Cover samples: training trigger, true label
        (in extra_indices["cover"]). Trigger choices: one seeded stream, poison samples first, then
        cover samples, each in index order."""
        poison, cover = self.select_poison_and_cover(train)
        images, labels = train.images.clone(), train.labels.clone()
        generator = self.trigger_generator()
        images[poison] = self._train_trigger(train.images[poison], generator)
        if len(cover):
            images[cover] = self._train_trigger(train.images[cover], generator)
        labels[poison] = self.target_labels(train.labels[poison])
        return PoisonedTrainSet(ImageSet(images, labels), poison, train.labels.clone(), {"cover": cover})
