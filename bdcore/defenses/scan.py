"""SCAn: a representation is a class identity plus a variation shared by all classes; a label whose
samples are better explained by two identities than by one is contaminated, its odd subgroup poison.

Tang, Wang, Tang, Zhang, "Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor
Contamination Detection", USENIX Security 2021.

Global model, fitted by EM on the defender's clean subset (the paper's "clean set"): penultimate
representations r = mu + e with identity mu ~ N(0, S_mu) per class and variation e ~ N(0, S_e) shared
by all classes (the joint Bayesian model of Chen et al., ECCV 2012). Local model, per label of the
poisoned training set: untangle the label into two subgroups (alternating subgroup means and
assignment by the S_e-Mahalanobis distance, i.e. LDA with S_e) and compute the log-likelihood ratio
J = mean_i [|r_i - mu|^2 - |r_i - mu_c(i)|^2] (|.| the S_e^-1 norm; mu the one-identity posterior
mean, mu_c(i) the sample's subgroup mean). J* = (J - median) / (1.4826 MAD) over labels; labels with
J* > e^2 are contaminated (the paper's threshold). Inside a contaminated label, the subgroup that is
not the label's clean identity is flagged.

Defaults: threshold e^2, EM until the covariances move by < 1e-5 (at most 100 iterations), 100
untangling iterations.

Measured on digits, 10% poison, smallcnn seeds 0 / 1, 5% clean subset (AUROC over all 1438
samples, TPR and precision of the flagged set): badnet AUROC 0.975 / 0.975, TPR 0.97 / 0.97,
precision 1.00 / 1.00, J* of label 0 59 / 60, of the others at most 2.9 / 3.7; blended AUROC 1.000 /
0.991, TPR 1.00 / 0.99, precision 1.00 / 1.00, J* of label 0 40 / 18, of the others at most 2.5 /
2.8. Only label 0 is flagged in all four cells. ~5 s per cell on 1 CPU thread.

Deviations:
- S_e is shrunk towards a scaled identity (`shrinkage`, 0.1) before inversion: the clean subset
  holds fewer samples than the representation has dimensions (72 vs 128 on digits at 5%), so S_e is
  singular and the paper's inverse does not exist (reference code uses a pseudo-inverse, which
  ignores the directions where clean samples do not vary). Measured with `shrinkage=0` (a 1e-10
  ridge only) on seed 0: the same flags (badnet TPR 0.97, precision 1.00; J* of label 0 74).
- J* is one-sided (labels below the median are never flagged); the MAD form is symmetric.
- Untangling starts from a split along the label's top principal direction in S_e-whitened space
  instead of a random split, so the result does not depend on a random start.
- Which subgroup is the clean identity: the one the label's clean references fall into (majority by
  the S_e distance, ties by the distance of their mean); without references, the larger subgroup.
- Scores (the paper scores labels, not samples): every sample gets the log-likelihood ratio of its
  label's non-clean subgroup against the clean one, |r - mu_clean|^2 - |r - mu_other|^2, multiplied
  by max(1, J* / e^2) so that samples of contaminated labels outrank samples of clean labels that
  happen to sit on the far side of their label's arbitrary split.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from bdcore.defenses._latent import latent_sets
from bdcore.defenses.base import DefenseConfig
from bdcore.defenses.detection import Detection, PoisonDetector
from bdcore.defenses.registry import register_defense


class SCAnConfig(DefenseConfig):
    threshold: float = Field(float(np.e ** 2), gt=0)  # the paper's J* bound
    shrinkage: float = Field(0.1, ge=0, le=1)  # S_e towards a scaled identity before inversion
    em_tol: float = Field(1e-5, gt=0)
    em_iters: int = Field(100, ge=1)
    untangle_iters: int = Field(100, ge=1)


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    d = cov.shape[0]
    return (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d) + 1e-10 * np.eye(d)


def fit_global_model(x: np.ndarray, labels: np.ndarray, cfg: SCAnConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(S_mu, S_e, EM iterations) of the identity/variation model on centred clean representations."""
    classes = np.unique(labels)
    sums = np.stack([x[labels == c].sum(0) for c in classes])
    counts = np.array([(labels == c).sum() for c in classes])
    means = sums / counts[:, None]
    s_mu = np.cov(means.T, bias=True)
    s_e = np.cov((x - means[np.searchsorted(classes, labels)]).T, bias=True)
    iterations = 0
    for iterations in range(1, cfg.em_iters + 1):
        s_e_reg = _shrunk(s_e, cfg.shrinkage)
        # E-step: posterior mean of each class identity, S_mu (m S_mu + S_e)^-1 sum_i r_i
        identity = np.stack([s_mu @ np.linalg.solve(m * s_mu + s_e_reg, s) for m, s in zip(counts, sums)])
        variation = x - identity[np.searchsorted(classes, labels)]
        new_mu, new_e = np.cov(identity.T, bias=True), np.cov(variation.T, bias=True)
        moved = np.linalg.norm(new_mu - s_mu) + np.linalg.norm(new_e - s_e)
        s_mu, s_e = new_mu, new_e
        if moved < cfg.em_tol:
            break
    return s_mu, _shrunk(s_e, cfg.shrinkage), iterations


def _sq_dist(x: np.ndarray, centre: np.ndarray, f: np.ndarray) -> np.ndarray:
    diff = x - centre
    return np.einsum("ij,jk,ik->i", diff, f, diff)


def untangle(x: np.ndarray, f: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-subgroup split of a label's representations: (subgroup bool mask, mean 0, mean 1)."""
    w_vals, w_vecs = np.linalg.eigh(f)
    whitened = (x - x.mean(0)) @ (w_vecs * np.sqrt(np.maximum(w_vals, 0)))
    _, _, vt = np.linalg.svd(whitened, full_matrices=False)
    group = whitened @ vt[0] > 0
    if group.all() or not group.any():
        group = np.arange(len(x)) % 2 == 1
    for _ in range(iters):
        m0, m1 = x[~group].mean(0), x[group].mean(0)
        new = _sq_dist(x, m1, f) < _sq_dist(x, m0, f)
        if new.all() or not new.any() or (new == group).all():
            break
        group = new
    return group, x[~group].mean(0), x[group].mean(0)


@register_defense("scan")
class SCAn(PoisonDetector):
    config_class = SCAnConfig
    config: SCAnConfig

    def detect(self, model, data, clean, ctx) -> Detection:
        cfg = self.config
        sets = latent_sets(model, data, clean, ctx.info, ctx)
        centre = sets.clean_features.mean(0)
        s_mu, s_e, em_iterations = fit_global_model(sets.clean_features - centre, sets.clean_labels, cfg)
        f = np.linalg.inv(s_e)
        labels = np.unique(sets.labels)
        j = np.zeros(len(labels))
        llr = np.zeros(len(sets.labels))
        groups: dict[int, np.ndarray] = {}
        per_label: dict[str, dict] = {}
        for i, label in enumerate(labels):
            rows = sets.rows(label)
            x = sets.features[rows] - centre
            if len(rows) < 2:
                per_label[str(int(label))] = {"size": len(rows), "J": 0.0}
                continue
            group, m0, m1 = untangle(x, f, cfg.untangle_iters)
            mu = s_mu @ np.linalg.solve(len(x) * s_mu + s_e, x.sum(0))  # one identity: its posterior mean
            own = np.where(group[:, None], m1, m0)
            j[i] = float(np.mean(_sq_dist(x, mu, f) - np.einsum("ij,jk,ik->i", x - own, f, x - own)))
            # the clean identity is the subgroup the label's clean references fall into
            reference = sets.clean_of(label) - centre
            if len(reference):
                votes = int((_sq_dist(reference, m1, f) < _sq_dist(reference, m0, f)).sum())
                clean_is_1 = votes * 2 > len(reference) or (
                    votes * 2 == len(reference) and _sq_dist(reference.mean(0)[None], m1, f)[0]
                    < _sq_dist(reference.mean(0)[None], m0, f)[0])
            else:  # without references, the paper's intuition: the larger subgroup is the label's own
                votes, clean_is_1 = None, bool(group.sum() * 2 > len(group))
            clean_mean, other_mean = (m1, m0) if clean_is_1 else (m0, m1)
            llr[rows] = _sq_dist(x, clean_mean, f) - _sq_dist(x, other_mean, f)
            groups[int(label)] = group != clean_is_1  # True: the non-clean subgroup
            per_label[str(int(label))] = {"size": len(rows), "J": j[i], "subgroup_sizes": [int((~group).sum()),
                                          int(group.sum())], "clean_subgroup": int(clean_is_1),
                                          "references_in_subgroup_1": votes, "n_references": len(reference)}
        median = float(np.median(j))
        mad = 1.4826 * float(np.median(np.abs(j - median)))
        j_star = (j - median) / max(mad, 1e-12)
        scores = np.zeros(len(sets.labels))
        flagged = np.zeros(len(sets.labels), dtype=bool)
        flagged_labels = []
        for i, label in enumerate(labels):
            rows = sets.rows(label)
            per_label[str(int(label))]["J_star"] = float(j_star[i])
            scores[rows] = llr[rows] * max(1.0, j_star[i] / cfg.threshold)
            if j_star[i] > cfg.threshold and int(label) in groups:
                flagged[rows[groups[int(label)]]] = True
                flagged_labels.append(str(int(label)))
            per_label[str(int(label))]["flagged"] = int(flagged[rows].sum())
        return Detection(scores, flagged, {"threshold": cfg.threshold, "em_iterations": em_iterations,
                                           "j_star": {str(int(lb)): float(v) for lb, v in zip(labels, j_star)},
                                           "flagged_labels": flagged_labels, "per_label": per_label})
