"""Comparing modules (``course_utils.grading.modules``): against the reference, causality, dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.grading import modules
from course_utils.grading.core import seeded_randn
from course_utils.grading.modules import _build

from course_utils.attention import MultiHeadAttention

from .test_ch03 import make_mha
from .helpers import Case, Cases, fails, registry_tests, stub

X = seeded_randn(2, 4, 3, seed=1)


class Shifted(nn.Linear):
    """Wrong: adds one to every output."""

    def forward(self, x):
        return super().forward(x) + 1


class NoisyInEval(nn.Linear):
    """Wrong: dropout that stays on in eval mode."""

    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, training=True)


class Transposed(nn.Module):
    """Correct: a bare (d_in, d_out) matrix used as x @ W."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x @ self.weight + self.bias


def compare(student_cls, **kwargs):
    def run(check):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            student = student_cls() if student_cls is Transposed else student_cls(3, 2)
        return check(student, nn.Linear(3, 2), [("x of shape (2, 4, 3)", (X,))], name="Linear", **kwargs)
    return run


def causal(fn, **kwargs):
    return lambda check: check(fn, X, name="cumulative", **kwargs)


def dropout_of(make_module, p):
    return lambda check: check(make_module(), lambda: (X.clone(),), dropout=p, name="layer")


class Forgetful(nn.Module):
    """Wrong: has a dropout rate but never applies it."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x * 2


class ToList(nn.Module):
    """Wrong: returns a list."""

    def forward(self, x):
        return x.tolist()


def test_build_reports_init_errors_and_non_modules():
    assert isinstance(_build(nn.Linear, (3, 2), {}, "Linear", "case"), nn.Linear)
    fails(_build, stub, (), {}, "Thing", "case", words=["Thing(...) (your __init__) is not implemented yet"])
    fails(_build, lambda: object(), (), {}, "Thing", "case", words=["expected an nn.Module", "super().__init__()"])


def test_check_module_against_reference_leaves_both_in_eval_mode():
    student, reference = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.9)), nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.9))
    modules.check_module_against_reference(student, reference, [("x", (X,))])
    assert not student.training and not reference.training


CASES = {
    "check_module_against_reference": Cases(
        right=[Case("same_layer", compare(nn.Linear)), Case("bare_matrix", compare(Transposed)),
               Case("no_perturbation", compare(nn.Linear, perturb_seed=None))],
        wrong=[Case("shifted", compare(Shifted), ("Linear", "values differ")),
               Case("dropout_in_eval", compare(NoisyInEval), ("two calls in eval mode",)),
               Case("fused_wrong", lambda check: check(make_mha("scale_d_out", fused=True)(6, 8, 8, 0.0, 2),
                                                       MultiHeadAttention(6, 8, 8, 0.0, 2, use_sdpa=False),
                                                       [("x", (seeded_randn(2, 5, 6, seed=3),))]),
                    ("values differ", "fused query/key/value projection")),
               Case("other_parameters", lambda check: check(nn.Linear(3, 2, bias=False), nn.Linear(3, 2), [("x", (X,))]),
                    ("cannot match", "bias (2,)"))],
    ),
    "check_causal": Cases(
        right=[Case("cumsum", causal(lambda x: x.cumsum(dim=1))),
               Case("token_ids", lambda check: check(lambda ids: torch.nn.functional.one_hot(ids, 11).float().cumsum(1),
                                                     torch.arange(12).reshape(2, 6) % 11, vocab_size=11))],
        wrong=[Case("reversed", causal(lambda x: x.flip(1).cumsum(dim=1).flip(1)), ("not causal", "earlier position")),
               Case("ignores_its_input", causal(lambda x: torch.zeros_like(x)), ("did not change",)),
               Case("raises", causal(lambda x: x[:, 99]), ("cumulative raised IndexError",))],
    ),
    "check_dropout_behaviour": Cases(
        right=[Case("nn_dropout", dropout_of(lambda: nn.Dropout(0.5), 0.5)),
               Case("no_dropout_wanted", dropout_of(nn.Identity, 0.0))],
        wrong=[Case("random_in_eval", dropout_of(lambda: NoisyInEval(3, 3), 0.5), ("eval mode", "different outputs", "training=self.training")),
               Case("never_applied", dropout_of(Forgetful, 0.5), ("train mode", "not random")),
               Case("not_a_tensor", dropout_of(ToList, 0.5), ("layer output", "expected a torch.Tensor"))],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(modules, CASES)
