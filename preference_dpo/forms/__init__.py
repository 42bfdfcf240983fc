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
