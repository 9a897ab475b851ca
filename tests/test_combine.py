"""Routing modes: top-k, threshold (never empty), full, and masking unavailable experts."""

import pytest
import torch

from router.combine import routing_weights

P = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.1, 0.7]])


def test_top1_and_topk():
    w1 = routing_weights(P, "top1")
    assert torch.equal(w1, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    w2 = routing_weights(P, "topk", k=2)
    assert torch.allclose(w2[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(w2.sum(-1), torch.ones(2))


def test_threshold_keeps_argmax_and_renormalises():
    w = routing_weights(P, "threshold", tau=0.2)
    assert torch.allclose(w[0], torch.tensor([0.625, 0.375, 0, 0]))
    w = routing_weights(torch.tensor([[0.26, 0.25, 0.25, 0.24]]), "threshold", tau=0.9)
    assert torch.equal(w, torch.tensor([[1.0, 0, 0, 0]]))


def test_full_is_the_probabilities():
    assert torch.equal(routing_weights(P, "full"), P)


def test_unavailable_expert_falls_back_to_next_best():
    avail = torch.tensor([False, True, True, True])
    w = routing_weights(P, "top1", available=avail)
    assert w[0].argmax().item() == 1 and w[0, 0] == 0
    with pytest.raises(ValueError):
        routing_weights(P, "top1", available=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        routing_weights(P, "nope")
