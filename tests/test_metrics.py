import pytest
import torch
from torch import nn

from bdcore.data import DatasetInfo, ImageSet
from bdcore.metrics import BackdoorMetrics, BackdoorTestSet, backdoor_metrics, defense_scores, der, rir

INFO = DatasetInfo("toy", num_classes=3, channels=1, height=1, width=1, mean=(0.0,), std=(1.0,), normalize=False)


class LookupModel(nn.Module):
    """Predicts the class stored in the image's single pixel (value = class index)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x.flatten(1)[:, 0] * 255).round().long()
        return nn.functional.one_hot(cls, 3).float() + 0 * self.dummy


def images(values):
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1)


def test_acc_asr_ra_hand_computed():
    clean = ImageSet(images([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))  # 3 of 4 right
    # Backdoor set: 5 images whose true labels are 1 or 2, target 0. Predictions: 0,0,1,2,0.
    bd = BackdoorTestSet(images([0, 0, 1, 2, 0]), torch.zeros(5, dtype=torch.long), torch.tensor([1, 2, 1, 1, 2]))
    m = backdoor_metrics(LookupModel(), clean, bd, INFO, device="cpu")
    assert m.acc == pytest.approx(0.75)
    assert m.asr == pytest.approx(3 / 5)
    assert m.ra == pytest.approx(1 / 5)  # only the third (pred 1, true 1)


@pytest.mark.parametrize("acc_bd,asr_bd,acc_def,asr_def,expected", [
    (0.90, 0.95, 0.88, 0.05, (0.90 - 0.02 + 1) / 2),  # typical: ASR falls, accuracy falls a little
    (0.90, 0.95, 0.93, 0.05, (0.90 + 1) / 2),  # accuracy rises: no bonus, max(0, .) clips it
    (0.90, 0.50, 0.85, 0.70, (0 - 0.05 + 1) / 2),  # ASR rises: no credit, still pays for accuracy
    (0.90, 0.95, 0.90, 0.95, 0.5),  # no-op defense
    (0.90, 1.00, 0.10, 0.00, (1.0 - 0.8 + 1) / 2),
])
def test_der(acc_bd, asr_bd, acc_def, asr_def, expected):
    assert der(acc_bd, asr_bd, acc_def, asr_def) == pytest.approx(expected)


@pytest.mark.parametrize("acc_bd,ra_bd,acc_def,ra_def,expected", [
    (0.90, 0.04, 0.88, 0.86, (0.82 - 0.02 + 1) / 2),
    (0.90, 0.04, 0.95, 0.86, (0.82 + 1) / 2),  # accuracy rises
    (0.90, 0.30, 0.80, 0.10, (0 - 0.10 + 1) / 2),  # RA falls
])
def test_rir(acc_bd, ra_bd, acc_def, ra_def, expected):
    assert rir(acc_bd, ra_bd, acc_def, ra_def) == pytest.approx(expected)


def test_defense_scores_uses_both():
    s = defense_scores(BackdoorMetrics(0.9, 0.95, 0.04), BackdoorMetrics(0.88, 0.05, 0.86))
    assert s["der"] == pytest.approx(0.94)
    assert s["rir"] == pytest.approx(0.90)
