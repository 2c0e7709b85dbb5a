"""Weight transfer (``course_utils.grading.weights``): the matching rules and seeded perturbation."""
from __future__ import annotations

import torch
from torch import nn

from course_utils.attention import SelfAttentionV2
from course_utils.grading.weights import perturb_parameters, transfer_weights

from .helpers import fails


def test_transfer_weights_rules():
    class Raw(nn.Module):  # bare (d_in, d_out) parameters used as x @ W
        def __init__(self):
            super().__init__()
            self.W_query = nn.Parameter(torch.randn(3, 2))
            self.W_key = nn.Parameter(torch.randn(3, 2))
            self.W_value = nn.Parameter(torch.randn(3, 2))

    ref = SelfAttentionV2(3, 2)
    pairs = transfer_weights(Raw(), ref)
    assert [r for _, r in pairs] == ["W_query.weight", "W_key.weight", "W_value.weight"]

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 6, bias=True)

    ref = SelfAttentionV2(3, 2, qkv_bias=True)
    student = Fused()
    transfer_weights(student, ref)
    assert torch.equal(ref.W_key.weight, student.qkv.weight[2:4])
    assert torch.equal(ref.W_value.bias, student.qkv.bias[4:6])

    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_query = nn.Linear(3, 2, bias=True)
            self.W_key = nn.Linear(3, 2)
            self.W_value = nn.Linear(3, 2)

    fails(transfer_weights, Extra(), SelfAttentionV2(3, 2), words=["cannot match", "W_query.bias (2,)", "reference"])


def test_transfer_weights_layer_norm_aliases_and_children():
    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.rand(4))
            self.beta = nn.Parameter(torch.rand(4))

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.shift = nn.Parameter(torch.zeros(4))

    student, reference = Norm(), Ref()
    assert transfer_weights(student, reference) == [("gamma", "scale"), ("beta", "shift")]
    assert torch.equal(reference.scale, student.gamma) and torch.equal(reference.shift, student.beta)

    outer_s, outer_r = nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 3))
    transfer_weights(outer_s, outer_r)
    assert torch.equal(outer_r[0].weight, outer_s[0].weight)


def test_perturb_parameters_is_seeded_and_leaves_the_global_state_alone():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    state = torch.get_rng_state()
    before = a.weight.detach().clone()
    perturb_parameters(a, seed=4)
    perturb_parameters(b, seed=4)
    assert not torch.equal(a.weight, before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(torch.get_rng_state(), state)
