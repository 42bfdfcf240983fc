"""The aligned-loss forms (ALIGN_LOSS), one small class each, behind one interface (`base.AlignedForm`).

A form declares what it needs (whose instructed view is its teacher, whether it compares next-token
distributions at every response position) and what to precompute before training; it computes its loss from
one batch (`base.FormInputs`). The trainer adds `ALPHA x form.loss(...)` to TRL's DPO loss and logs the same
metrics for every form, with no branch per form.

Adding a form: a class in a module of this package, and one line in `FORMS` (the launcher's choices come from
it). This module imports nothing heavy, so the settings can read the names without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import AlignedForm

# ALIGN_LOSS -> "module:class" in this package
FORMS = {
    "hinge": "margin:Hinge",
    "ref_hinge": "margin:RefHinge",
    "distill": "distill:Distill",
    "ref_distill": "distill:RefDistill",
    "onpolicy_distill": "onpolicy:OnPolicyDistill",
    "context_distill": "context:ContextDistill",
}

DEFAULT_FORM = "ref_distill"  # the form that transferred in every benchmark (README, "Which ALIGN_LOSS?")

# ALIGN_LOSS -> the settings it gets when ALPHA, DISTILL_TOP_K or DISTILL_REDUCTION are left empty. ALPHA's scale
# differs by form: the margin forms add ALPHA to DPO's per-pair weight (the user guide's 0.05-0.2); a KL summed per
# response (`sequence_sum`, and the on-policy divergence) is on the scale of DPO's summed log-probs, where 1 is its
# usual weight; `distill`'s per-token mean is measured at 1 (docs/method.md, "Forms of the aligned loss").
FORM_DEFAULTS = {
    "hinge": {"alpha": 0.1, "top_k": None, "reduction": "token_mean"},
    "ref_hinge": {"alpha": 0.1, "top_k": None, "reduction": "token_mean"},
    "distill": {"alpha": 1.0, "top_k": None, "reduction": "token_mean"},
    "ref_distill": {"alpha": 1.0, "top_k": 16, "reduction": "sequence_sum"},
    "onpolicy_distill": {"alpha": 1.0, "top_k": None, "reduction": "token_mean"},
    "context_distill": {"alpha": 1.0, "top_k": None, "reduction": "token_mean"},
}


def form_class(name: str) -> type[AlignedForm]:
    """The class of the form ALIGN_LOSS=`name`; `ValueError` naming the choices for another name."""
    if name not in FORMS:
        raise ValueError(f"unknown ALIGN_LOSS {name!r}; expected one of {', '.join(FORMS)}")
    module, cls = FORMS[name].split(":")
    return getattr(import_module(f".{module}", __name__), cls)


def form_for(args) -> AlignedForm:
    """The form that `args.align_loss` names, built from the run's settings."""
    return form_class(args.align_loss)(args)
