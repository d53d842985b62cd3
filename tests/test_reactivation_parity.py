"""Parity of BEC and the white-box re-activation loop with the seed paper's code (Zhu et al., NeurIPS 2024,
github.com/JulieCarlon/Backdoor-Reactivation-Attack): which layers BEC reads, where its samples come from,
how many top neurons a share keeps, and that every outer step of the universal perturbation sweeps the
poisoned samples batch by batch. Tiny models and a handful of samples: seconds.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bdcore.data.base import DatasetInfo
from bdcore.metrics import BackdoorTestSet
from bdcore.models import build_model
from bdcore.reactivation import AnalysisContext, PoisonedSamples, build_analysis
from bdcore.reactivation import bec
from bdcore.reactivation.bec import feature_layers, top_neurons
from bdcore.reactivation.whitebox import UapConfig, budget_of, optimise_uap

# normalize=False: a model's input is image / 255 (+ the perturbation), so a sample can be recognised.
RAW = DatasetInfo("raw", num_classes=4, channels=1, height=4, width=4, mean=(0.0,), std=(1.0,), normalize=False)
CIFAR = DatasetInfo("cifar-like", num_classes=10, channels=3, height=32, width=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_bec_reads_the_block_convs_of_preactresnet18_without_stem_or_shortcuts():
    # The paper's code hooks every Conv2d named "layer..." without "shortcut": the 16 block convs.
    blocks = [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
    preact = build_model("preactresnet18", CIFAR)
    assert feature_layers(preact) == blocks
    assert feature_layers(nn.ModuleDict({"net": preact})) == [f"net.{name}" for name in blocks]  # e.g. a wrapper
    # The same rule on a torchvision-style ResNet, whose projection shortcut is called `downsample`.
    assert feature_layers(build_model("resnet18", CIFAR)) == blocks


def test_a_share_keeps_floor_of_share_times_neurons_as_the_paper():
    tac = torch.arange(128.0)
    assert top_neurons(tac, 0.10).tolist() == list(range(127, 115, -1))  # int(12.8) = 12, in TAC order
    assert top_neurons(tac, 0.20).numel() == 25 and top_neurons(torch.arange(256.0), 0.05).numel() == 12
    assert top_neurons(torch.arange(4.0), 0.05).numel() == 1  # never empty on a tiny layer


class Recorder(nn.Module):
    """Two convs and a head; records the first pixel value (x 255) of every input it sees."""

    def __init__(self, seen: list[float], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.seen = seen
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 3, padding=1), nn.Conv2d(10, 10, 3, padding=1)
        self.head = nn.Linear(160, 4)

    def forward(self, x):
        self.seen.extend((x[:, 0, 0, 0] * 255).round().tolist())
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def constant_images(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def test_bec_ranks_on_training_pairs_and_measures_cka_on_poisoned_test_samples():
    # Training pairs: triggered 10, clean 20; backdoor test set: 30 (triggered). The defended and the
    # clean model only ever see the CKA samples, which (as in the paper's code) are poisoned *test*
    # samples; the code before this fix fed them the training split.
    seen = {"backdoored": [], "defended": [], "clean": []}
    fit = PoisonedSamples(constant_images([10] * 40), torch.zeros(40, dtype=torch.long), constant_images([20] * 40))
    labels = torch.zeros(50, dtype=torch.long)
    test = BackdoorTestSet(constant_images([30] * 50), labels, labels + 1)
    ctx = AnalysisContext(info=RAW, backdoored=Recorder(seen["backdoored"], 0), defended=Recorder(seen["defended"], 1),
                          fit=fit, evaluate=test, clean_model=lambda: Recorder(seen["clean"], 2))
    out = build_analysis("bec", samples=40, cka_samples=24, batch_size=8).run(ctx)
    assert seen["defended"] == [30.0] * 24 and seen["clean"] == [30.0] * 24
    assert sorted(set(seen["backdoored"])) == [10.0, 20.0, 30.0]
    assert seen["backdoored"].count(10.0) == seen["backdoored"].count(20.0) == 40
    assert out["budget"] == {"tac_samples": 40, "cka_samples": 24, "layers": 2}


def test_tac_is_the_mean_l2_change_of_each_channel_between_poisoned_and_clean_inputs():
    torch.manual_seed(0)
    model = Recorder([], 3)
    pairs = PoisonedSamples(torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8), torch.zeros(9, dtype=torch.long),
                            torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8))
    ranking = bec.tac_ranking(model, pairs, ["conv1", "conv2"], RAW, torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        change = model.conv1(pairs.triggered.float() / 255) - model.conv1(pairs.clean.float() / 255)
    assert torch.allclose(ranking["conv1"], change.flatten(2).norm(dim=2).mean(0), atol=1e-5)
    assert ranking["conv2"].shape == (10,)


def sample_ids(seen: list[float]) -> list[int]:
    return [int(v) // 10 for v in seen]


@pytest.mark.parametrize("n, batch_size, drop_last, per_outer", [
    (12, 4, True, 12),  # 3 batches: every sample once per outer step
    (10, 4, True, 8),  # the paper's loader drops the incomplete last batch (a different one each step)
    (10, 4, False, 10),
    (6, 128, True, 6),  # a batch larger than the samples is all of them (min(batch, n) as the paper)
])
def test_each_outer_step_sweeps_the_samples_batch_by_batch_with_inner_steps_on_each(n, batch_size, drop_last,
                                                                                   per_outer):
    seen: list[float] = []
    samples = PoisonedSamples(constant_images([10 * i + 5 for i in range(n)]), torch.zeros(n, dtype=torch.long))
    config = UapConfig(outer_steps=2, inner_steps=3, batch_size=batch_size, drop_last=drop_last, eps=1e-4,
                       samples=n)
    optimise_uap([Recorder(seen, 0)], samples, RAW, config, torch.device("cpu"))
    size = min(batch_size, n)
    sizes = [size] * (per_outer // size) + ([per_outer % size] if per_outer % size else [])
    assert len(seen) == 2 * 3 * per_outer  # outer x inner forward passes over each batch of the step
    ids = sample_ids(seen)
    for outer in range(2):
        step = ids[outer * per_outer * 3:(outer + 1) * per_outer * 3]
        assert len(set(step)) == per_outer and all(step.count(i) == 3 for i in set(step))
        start = 0
        for b in sizes:  # the inner steps of one batch come one after another
            chunk = step[start:start + 3 * b]
            assert chunk[:b] == chunk[b:2 * b] == chunk[2 * b:]
            start += 3 * b
    batches = len(sizes)
    assert budget_of(config, n)["steps"] == 2 * batches * 3


def test_the_whitebox_defaults_are_the_papers():
    config = UapConfig()
    assert (config.outer_steps, config.inner_steps, config.lr, config.batch_size, config.samples, config.drop_last,
            config.eps) == (50, 5, 0.05, 128, 1000, True, 0.05)
    assert budget_of(config)["steps"] == 50 * 7 * 5  # 1,000 samples in batches of 128: 7 full batches
