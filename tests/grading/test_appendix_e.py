"""Assignment appendix_e's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import torch
from torch import nn

from course_utils import lora
from course_utils.grading import appendix_e
from course_utils.grading.factories import grading_config

from .helpers import Cases, leaves_state_alone, registry_tests, right, stub, wrong


class LoRAWithLinears(nn.Module):
    """Correct: A and B as bias-free nn.Linear layers."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Linear(in_dim, rank, bias=False)
        self.B = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.B(self.A(x)) * self.scaling


def make_lora(mistake):
    class Broken(nn.Module):
        def __init__(self, in_dim, out_dim, rank, alpha):
            super().__init__()
            self.A = nn.Parameter(torch.zeros(in_dim, rank) if mistake == "zero_A" else torch.randn(in_dim, rank))
            self.B = nn.Parameter(torch.randn(rank, out_dim) if mistake == "random_B" else torch.zeros(rank, out_dim))
            if mistake == "not_parameter":
                del self.A
                self.A = torch.randn(in_dim, rank)
            self.scale = alpha if mistake == "alpha" else alpha / rank

        def forward(self, x):
            return self.scale * (x @ self.A @ self.B)
    return Broken


def make_linear_with_lora(mistake=None, lora_cls=LoRAWithLinears):
    class Wrapper(nn.Module):
        def __init__(self, linear, rank, alpha):
            super().__init__()
            self.linear = nn.Linear(linear.in_features, linear.out_features) if mistake == "new_linear" else linear
            self.lora = lora_cls(linear.in_features, linear.out_features, rank, alpha)

        def forward(self, x):
            if mistake == "no_lora":
                return self.linear(x)
            if mistake == "only_lora":
                return self.lora(x)
            return self.lora(x) + self.linear(x)
    return Wrapper


def replace_via_named_modules(model, rank, alpha):
    """Correct: collect (parent, name) pairs first, then swap; freeze by identity."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for p in model.parameters():
        p.requires_grad = False
    for parent, name in targets:
        setattr(parent, name, make_linear_with_lora()(getattr(parent, name), rank, alpha))
    return model


def make_replace(mistake):
    def fn(model, rank, alpha):
        if mistake != "no_freeze" and mistake != "freeze_after":
            for p in model.parameters():
                p.requires_grad = False

        def swap(module):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, lora.LinearWithLoRA(child, rank, alpha))
                elif mistake != "shallow":
                    swap(child)

        swap(model)
        if mistake == "freeze_after":
            for p in model.parameters():
                p.requires_grad = False
        return model
    return fn


def replace_with_mis_scaled_lora(model, rank, alpha):
    """Wrong: every layer wrapped and the right weights frozen, but each update scaled by alpha, not alpha / rank."""
    for p in model.parameters():
        p.requires_grad = False
    wrapper = make_linear_with_lora(lora_cls=make_lora("alpha"))

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, wrapper(child, rank, alpha))
            else:
                swap(child)

    swap(model)
    return model


def test_checks_leave_the_global_random_state_and_threads_alone():
    leaves_state_alone(lambda: appendix_e.check_replace_linear_with_lora(lora.replace_linear_with_lora))


CASES = {
    "check_lora_layer": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", lora.LoRALayer), ("linears", LoRAWithLinears))
               for label, kw in (("default", {}), ("rank_1_float64", dict(in_dim=3, out_dim=7, rank=1, alpha=1.0, batch_shape=(2, 5), seed=2,
                                                                           dtype=torch.float64)))],
        wrong=[wrong("alpha", make_lora("alpha"), "multiplied by alpha", "alpha / rank"),
               wrong("random_B", make_lora("random_B"), "B does not start at zero", "pretrained model"),
               wrong("zero_A", make_lora("zero_A"), "A does not start random"),
               wrong("not_parameter", make_lora("not_parameter"), "A is not a trainable parameter"),
               wrong("stub", stub, "not implemented yet")],
    ),
    "check_linear_with_lora": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", lora.LinearWithLoRA), ("by_hand", make_linear_with_lora()))
               for label, kw in (("default", {}), ("no_bias", dict(in_dim=4, out_dim=6, rank=3, alpha=2.0, bias=False, batch_shape=(3,), seed=2)))],
        wrong=[wrong("new_linear", make_linear_with_lora("new_linear"), "not those of the layer you were given"),
               wrong("no_lora", make_linear_with_lora("no_lora"), "update is not added"),
               wrong("only_lora", make_linear_with_lora("only_lora"), "only the LoRA update")],
    ),
    "check_replace_linear_with_lora": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", lora.replace_linear_with_lora), ("named_modules", replace_via_named_modules))
               for label, kw in (("default", {}), ("3_layers_bias", dict(cfg=grading_config(n_layers=3, qkv_bias=True, drop_rate=0.0), rank=1,
                                                                          alpha=1.0, seed=2)))],
        wrong=[wrong("shallow", make_replace("shallow"), "were not wrapped", "recursive"),
               wrong("no_freeze", make_replace("no_freeze"), "left trainable", "tok_emb.weight"),
               wrong("freeze_after", make_replace("freeze_after"), "frozen too"),
               wrong("mis_scaled", replace_with_mis_scaled_lora, "the adapted model", "random values written into every A and B")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(appendix_e, CASES)
