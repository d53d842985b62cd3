"""SAU (Shared Adversarial Unlearning): craft adversarial examples that the model being repaired and
the frozen backdoored model misclassify the same way (shared ones, which include the poisoned
samples), and unlearn them: the repaired model must not predict the class they share.

Wei, Zhang, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning
Shared Adversarial Examples", NeurIPS 2023. Per clean batch: (max) PGD on a per-image perturbation
(L_inf 0.2, [0, 1] pixel space, 5 sign steps of 0.2, started at +0.2) descending
beta_1 * L_adv + beta_2 * L_share, where L_adv = -CE(y) averaged over both models on images not yet
misclassified by each, and L_share = Jensen-Shannon divergence between the two models' predictions on
images not yet shared-adversarial; (min) one Adam step on
lmd_1 * CE(f(x), y) + lmd_2 * CE(f(x_adv), y) + lmd_3 * L_SAR, where L_SAR averages
-[log(1 - p_k) + log(sum_{j != k} p_j)] / 2 of the repaired model, k being the backdoored model's
prediction on x_adv, over images the backdoored model gets wrong (k != y and k != its clean prediction).
Defaults (REFERENCE / BackdoorBench sau config, by the paper's first author): Adam lr 1e-4
(betas 0.9, 0.999, no weight decay), n_rounds 100 passes over the clean data, batch 256, PGD L_inf 0.2
step 0.2, 5 steps, init "max", beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, one outer step per
batch, BN in evaluation mode (train_mode False), no augmentation.
Deviations: x + delta is clamped to [0, 1] (the reference code leaves it optional); BackdoorBench builds
a cosine scheduler for Adam but never steps it, so the learning rate is constant here too.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from bdcore.defenses._batches import Batches, defense_device, held_out_accuracy
from bdcore.defenses.base import DefenseConfig, DefenseContext, DefenseOutcome, PostTrainingDefense
from bdcore.defenses.registry import register_defense


class SAUConfig(DefenseConfig):
    n_rounds: int = Field(100, ge=1)  # passes over the clean fitting data
    lr: float = Field(1e-4, gt=0)  # Adam
    batch_size: int = Field(256, ge=1)
    pgd_bound: float = Field(0.2, gt=0)  # L_inf, [0, 1] pixel space
    pgd_step: float = Field(0.2, gt=0)
    pgd_steps: int = Field(5, ge=1)
    beta_1: float = Field(0.01, ge=0)  # adversarial term of the perturbation search
    beta_2: float = Field(1.0, ge=0)  # shared (JS) term of the perturbation search
    lmd_1: float = Field(1.0, ge=0)  # clean CE
    lmd_2: float = Field(0.0, ge=0)  # adversarial-training CE (off by default)
    lmd_3: float = Field(1.0, ge=0)  # shared adversarial risk
    train_mode: bool = False  # True: BN in training mode during the outer step
    augment: bool = False


def _perturb(images01: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (images01 + delta).clamp(0.0, 1.0)


def shared_pgd(model, reference, batches: Batches, images, labels, cfg: SAUConfig) -> torch.Tensor:
    """Per-image L_inf perturbations that make both models err, and err on the same class."""
    with torch.no_grad():
        own = model(batches.model_input(images)).argmax(1)
        own_ref = reference(batches.model_input(images)).argmax(1)
    n = images.shape[0]
    delta = torch.full_like(images, cfg.pgd_bound).requires_grad_(True)  # init "max"
    for _ in range(cfg.pgd_steps):
        x = batches.model_input(_perturb(images, delta))
        logits, logits_ref = model(x), reference(x)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != own, pred_ref != own_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        # Push each model's loss up only on images it still classifies as before.
        adv = (F.cross_entropy(logits, labels, reduction="none") * (~fooled)).sum() \
            + (F.cross_entropy(logits_ref, labels, reduction="none") * (~fooled_ref)).sum()
        loss_adv = -adv / 2 / n
        p, q = F.softmax(logits, 1).clamp(min=1e-8), F.softmax(logits_ref, 1).clamp(min=1e-8)
        m = 0.5 * (p + q)
        js = 0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * m.log() + q * m.log())
        loss_share = (js.sum(1) * (~shared)).sum() / n
        loss = cfg.beta_1 * loss_adv + cfg.beta_2 * loss_share
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= cfg.pgd_step * grad.sign()
            delta.clamp_(-cfg.pgd_bound, cfg.pgd_bound)
        if not bool((~shared).any()):
            break
    return delta.detach()


@register_defense("sau")
class SAU(PostTrainingDefense):
    config_class = SAUConfig
    config: SAUConfig
    holdout_fraction = 0.0  # selects nothing: fits on the whole clean subset, as BackdoorBench

    def repair(self, model, clean, ctx: DefenseContext) -> DefenseOutcome:
        cfg = self.config
        device = defense_device(ctx)
        model.to(device).eval()
        val_before = held_out_accuracy(model, clean, ctx.info, device)
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        batches = Batches(clean.train, ctx.info, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        num_classes = ctx.info.num_classes

        history = []
        for _round in range(cfg.n_rounds):
            sums = torch.zeros(5, device=device)  # loss, clean CE, shared loss, adversarial hits, shared hits
            seen = 0
            for images, labels in batches.epoch():
                model.eval()
                requires = [p.requires_grad for p in params]
                for p in params:
                    p.requires_grad_(False)
                try:
                    delta = shared_pgd(model, reference, batches, images, labels, cfg)
                finally:
                    for p, r in zip(params, requires):
                        p.requires_grad_(r)
                adv_images = _perturb(images, delta)
                n = images.shape[0]

                if cfg.train_mode:
                    model.train()
                logits, adv_logits = model(batches.model_input(torch.cat([images, adv_images]))).split(n)
                model.eval()
                with torch.no_grad():
                    own_ref = reference(batches.model_input(images)).argmax(1)
                    adv_pred_ref = reference(batches.model_input(adv_images)).argmax(1)
                adv_pred = adv_logits.detach().argmax(1)
                fooled = adv_pred != labels
                fooled_ref = (adv_pred_ref != labels) & (adv_pred_ref != own_ref)
                shared = fooled & fooled_ref & (adv_pred == adv_pred_ref)

                loss_clean = F.cross_entropy(logits, labels)
                loss_at = F.cross_entropy(adv_logits, labels)
                # Shared adversarial risk: on images the backdoored model gets wrong, lower the repaired
                # model's probability of that same wrong class (two equal forms, averaged, for stability).
                probs = F.softmax(adv_logits, 1)
                pos = probs.gather(1, adv_pred_ref.unsqueeze(1)).squeeze(1)
                neg = (probs * (1 - F.one_hot(adv_pred_ref, num_classes).to(probs.dtype))).sum(1)
                per_image = -(torch.log(1e-6 + neg.clamp(max=0.999)) + torch.log(1 + 1e-6 - pos.clamp(min=0.001))) / 2
                loss_shared = (per_image * fooled_ref).sum() / n
                loss = cfg.lmd_1 * loss_clean + cfg.lmd_2 * loss_at + cfg.lmd_3 * loss_shared
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                sums += torch.stack([loss.detach() * n, loss_clean.detach() * n, loss_shared.detach() * n,
                                     fooled.sum().float(), shared.sum().float()])
                seen += n
            values = (sums / seen).tolist()  # one sync per round
            history.append(dict(zip(["loss", "clean_loss", "shared_loss", "adv_success", "shared_rate"], values)))

        model.eval()
        diagnostics = {
            "rounds": cfg.n_rounds,
            "final_adv_success_rate": float(history[-1]["adv_success"]),
            "final_shared_rate": float(history[-1]["shared_rate"]),
            "first_adv_success_rate": float(history[0]["adv_success"]),
            "first_shared_rate": float(history[0]["shared_rate"]),
            "loss_per_round": [float(r["loss"]) for r in history],
            "shared_loss_per_round": [float(r["shared_loss"]) for r in history],
            "val_acc_before": val_before,
            "val_acc_after": held_out_accuracy(model, clean, ctx.info, device),
        }
        return DefenseOutcome(model.to("cpu").eval(), diagnostics)
