"""STRIP: a trigger dominates whatever it is superimposed on, so a triggered input keeps its predicted
class under strong perturbation and its predictions have unusually low entropy.

Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural
Networks", ACSAC 2019.

Each input is superimposed on `n_superimpose` clean images drawn from the defender's subset (pixel
sum, saturated at white, as the authors' image blend with weights 1 and 1), and its score is minus the
mean Shannon entropy (bits) of the model's predictions on the copies. The decision boundary is set on
the defender's clean inputs at the target false-rejection rate `frr`: their entropies sorted
ascending, the one at index int(frr * n); inputs strictly below it are flagged (one-sided: a low
entropy is the trigger's signature). As a poisoned-sample detector it scores the training set (and
retrains without the flagged samples); as an inference-time filter (`filter_quality`) it reports the
share of triggered test inputs rejected at that boundary, and the FRR actually reached on the clean
test set.

Defaults (BackdoorBench detection_pretrain/strip.py and detection_infer/strip.py: STRIP(N=100,
strip_alpha=1.0, defense_fpr=0.1)): 100 superimpositions, frr 0.1, the boundary rule above. Its
upper threshold is +inf, so BackdoorBench's rule is one-sided, as the paper's.
Deviations: the clean references are the defender's clean subset (BackdoorBench draws them from the
clean test set); the blend is the authors' saturating pixel sum (weights 1 and 1, clipped at white)
where BackdoorBench adds the two normalised tensors unclipped (pixel x1 + x2 - mean); overlays are
drawn per input (BackdoorBench: the same 100 clean images for a batch of 128); entropy in bits
(BackdoorBench: nats, the same decisions).
"""
from __future__ import annotations

import torch
from pydantic import Field

from bdcore.data.augment import Normalizer
from bdcore.defenses._batches import defense_device
from bdcore.defenses._latent import all_clean
from bdcore.defenses.base import DefenseConfig
from bdcore.defenses.detection import Detection, InputFilter, PoisonDetector, auroc
from bdcore.defenses.registry import register_defense


class STRIPConfig(DefenseConfig):
    n_superimpose: int = Field(100, ge=2)
    frr: float = Field(0.1, gt=0, lt=1)  # false-rejection rate on clean inputs that sets the boundary
    batch_size: int = Field(1024, ge=1)  # superimposed copies per forward pass


@register_defense("strip")
class STRIP(PoisonDetector, InputFilter):
    config_class = STRIPConfig
    config: STRIPConfig

    @torch.no_grad()
    def entropies(self, model, images: torch.Tensor, clean, ctx, salt: int = 0) -> torch.Tensor:
        """Mean prediction entropy (bits) of every uint8 image in `images` under superimposition."""
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        normalize = Normalizer(ctx.info, device)
        overlays = all_clean(clean).images.to(device)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt)
        per_chunk = max(1, cfg.batch_size // cfg.n_superimpose)
        out = []
        for start in range(0, len(images), per_chunk):
            chunk = images[start : start + per_chunk].to(device)
            picks = torch.randint(len(overlays), (len(chunk), cfg.n_superimpose), generator=generator).to(device)
            blended = (chunk.unsqueeze(1).float() + overlays[picks].float()).clamp_(max=255.0).div_(255.0)
            probs = torch.softmax(model(normalize(blended.flatten(0, 1))).float(), 1)
            entropy = -(probs * torch.log2(probs.clamp_min(1e-12))).sum(1)
            out.append(entropy.view(len(chunk), cfg.n_superimpose).mean(1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def boundary(self, model, clean, ctx) -> tuple[float, torch.Tensor]:
        """(entropy boundary at the configured FRR, the clean inputs' entropies): the sorted clean
        entropy at index int(frr * n), so int(frr * n) clean inputs fall strictly below it."""
        reference = self.entropies(model, all_clean(clean).images, clean, ctx, salt=1)
        ordered = reference.double().sort().values
        return float(ordered[int(self.config.frr * len(ordered))]), reference

    def detect(self, model, data, clean, ctx) -> Detection:
        threshold, reference = self.boundary(model, clean, ctx)
        entropy = self.entropies(model, data.images, clean, ctx)
        return Detection(-entropy, entropy < threshold, {
            "entropy_boundary": threshold,
            "frr_target": self.config.frr,
            "n_superimpose": self.config.n_superimpose,
            "clean_reference_entropy_mean": float(reference.mean()),
        })

    def filter_quality(self, model, clean, clean_test, backdoor_images: torch.Tensor, ctx) -> dict[str, float]:
        """STRIP as an input filter in front of `model`: the boundary comes from the defender's clean
        subset; triggered test inputs below it are rejected (TPR), clean test inputs too (FRR)."""
        threshold, _ = self.boundary(model, clean, ctx)
        clean_entropy = self.entropies(model, clean_test.images, clean, ctx, salt=2)
        triggered_entropy = self.entropies(model, backdoor_images, clean, ctx, salt=3)
        scores = torch.cat([-triggered_entropy, -clean_entropy])
        positive = torch.cat([torch.ones(len(triggered_entropy), dtype=torch.bool),
                              torch.zeros(len(clean_entropy), dtype=torch.bool)])
        return {
            "inference_frr_target": self.config.frr,
            "inference_tpr": float((triggered_entropy < threshold).double().mean()),
            "inference_frr": float((clean_entropy < threshold).double().mean()),
            "inference_auroc": auroc(scores, positive),
        }
