"""The feature probe behind issue 9's diagnosis: a linear probe that finds a linear signal and not a random one."""
import torch

from jobs.bench.feature_probe import linear_probe_auroc


def test_the_probe_finds_a_linearly_encoded_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g)
    y = (torch.rand(4000, generator=g) < 0.03).long()  # rare positives, as anomalous patches are
    x_signal = x.clone()
    x_signal[:, 5] += 2.5 * y  # one feature direction carries the label
    assert linear_probe_auroc(x_signal, y) > 0.9
    assert abs(linear_probe_auroc(x, y) - 0.5) < 0.1
