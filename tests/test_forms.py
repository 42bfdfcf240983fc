"""The aligned-loss forms behind one interface (`preference_dpo/forms/`), on hand-computed batches, and the
structure that keeps them there: one registry, no per-form branch in the trainer's loss, no import circle."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preference_dpo.forms import FORMS, form_class
from preference_dpo.forms.base import FormInputs, GuidedLogps, GuidedViews
from preference_dpo.losses import LMHead

PACKAGE = Path(__file__).resolve().parents[1] / "preference_dpo"


def settings(**overrides):
    return SimpleNamespace(**{"distill_reduction": "sequence_sum", "distill_top_k": None, **overrides})


def inputs(base, views, student=None, lengths=None, batch=None, heads=None, mode="train"):
    """A batch as the trainer hands it to a form; `views` maps who -> GuidedLogps, and the passes made are
    recorded in `inputs.passes`."""
    passes = []

    def guided_pass(who, with_hidden):
        passes.append((who, with_hidden))
        return views[who]

    made = FormInputs(
        mode=mode,
        base=base,
        batch=batch or {},
        response_lengths=lengths if lengths is not None else torch.zeros(0, dtype=torch.long),
        views=GuidedViews(guided_pass, lambda who: heads[who]),
        token_mean_divisor=lambda lengths: None,
        student_hidden=student,
    )
    made.passes = passes
    return made


def test_every_registered_form_resolves_to_its_class_and_the_launcher_offers_exactly_those():
    from preference_dpo.config import ALIGN_LOSSES

    assert ALIGN_LOSSES == tuple(FORMS)
    for name in FORMS:
        cls = form_class(name)
        assert cls.name == name and cls.teacher in ("policy", "reference")
    assert [n for n in FORMS if form_class(n).per_token] == ["distill", "ref_distill", "onpolicy_distill"]
    with pytest.raises(ValueError, match="unknown ALIGN_LOSS 'nope'; expected one of hinge, ref_hinge"):
        form_class("nope")


def test_hinge_pulls_towards_the_policys_guided_margin_and_ref_hinge_towards_the_references():
    """h_base = [1, 3]; the policy's guided margin [3, 2] -> relu([2, -1]) = [2, 0] -> 1.0; the reference's
    [2, 5] -> relu([1, 2]) -> 1.5. Each asks for its own teacher's view only, once."""
    base = GuidedLogps(torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-2.0, -5.0]))
    views = {
        "policy": GuidedLogps(torch.tensor([-1.0, -3.0]), torch.tensor([-4.0, -5.0])),
        "reference": GuidedLogps(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, -5.0])),
    }
    hinge, ref_hinge = form_class("hinge")(settings()), form_class("ref_hinge")(settings())
    batch = inputs(base, views)
    loss = hinge.loss(batch)
    assert loss.item() == pytest.approx(1.0)
    hinge.target(batch)  # the metrics ask again: no second pass
    assert batch.passes == [("policy", False)]
    loss.backward()
    assert torch.equal(base.chosen.grad, torch.tensor([-0.5, 0.0]))  # d/dh_base of mean(relu(.)), per pair

    batch = inputs(GuidedLogps(base.chosen.detach(), base.rejected), views)
    assert ref_hinge.loss(batch).item() == pytest.approx(1.5)
    assert batch.passes == [("reference", False)] and not batch.guided_computed("policy")


def test_distill_forms_take_the_kl_of_their_teachers_hidden_states_through_their_teachers_head():
    """Identity LM heads (2 x 2), so the hidden states are the logits. Student rows [0, 0] and [0, 0]; the
    policy's teacher rows [0, ln 3], [0, 0]; the reference's [0, 0], [0, ln 3]. KL(softmax([0, ln 3]) ||
    uniform) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; sequence_sum over 2 responses of one position each:
    mean([0.1308, 0]) for `distill`, mean([0, 0.1308]) for `ref_distill`: 0.065406 both, from other rows."""
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    head = LMHead(weight=torch.eye(2))
    teacher_rows = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    views = {
        "policy": GuidedLogps(torch.zeros(1), torch.zeros(1), teacher_rows),
        "reference": GuidedLogps(torch.zeros(1), torch.zeros(1), teacher_rows.flip(0)),
    }
    student = torch.zeros(2, 2, requires_grad=True)
    lengths = torch.tensor([1, 1])
    for name, first_row_kl in (("distill", kl), ("ref_distill", 0.0)):
        form = form_class(name)(settings())
        batch = inputs(GuidedLogps(torch.zeros(1), torch.zeros(1)), views, student, lengths,
                       heads={"policy": head, "reference": head})  # fmt: skip
        per_token = form.per_token_kl(batch)
        assert per_token.tolist() == pytest.approx([first_row_kl, kl - first_row_kl], abs=1e-6)
        assert form.loss(batch).item() == pytest.approx(kl / 2, abs=1e-6)
        assert batch.passes == [(form.teacher, True)]

    token_mean = form_class("distill")(settings(distill_reduction="token_mean"))
    batch = inputs(GuidedLogps(torch.zeros(1), torch.zeros(1)), views, student, lengths,
                   heads={"policy": head, "reference": head})  # fmt: skip
    assert token_mean.loss(batch).item() == pytest.approx(kl / 2, abs=1e-6)  # 2 positions: the same mean here


def test_ref_distill_reads_a_precomputed_top_k_teacher_and_refuses_misaligned_rows():
    """K = |V| = 2 is the exact KL: the top-K store of the teacher rows gives the same per-position values, and
    no guided pass runs. A store whose positions differ from the batch's is an error, not a silent shift."""
    from preference_dpo.losses import topk_teacher

    head = LMHead(weight=torch.eye(2))
    teacher_rows = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    ids, logps, rest = topk_teacher(teacher_rows, 2)
    store = {
        "teacher_ids": ids,
        "teacher_logps": logps,
        "teacher_log_rest": rest,
        "teacher_lengths": torch.tensor([1, 1]),
    }
    form = form_class("ref_distill")(settings(distill_top_k=2))
    batch = inputs(GuidedLogps(torch.zeros(1), torch.zeros(1)), {}, torch.zeros(2, 2), torch.tensor([1, 1]),
                   batch=store, heads={"policy": head})  # fmt: skip
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert form.per_token_kl(batch).tolist() == pytest.approx([kl, 0.0], abs=1e-6)
    assert batch.passes == []
    batch = inputs(GuidedLogps(torch.zeros(1), torch.zeros(1)), {}, torch.zeros(2, 2), torch.tensor([2, 0]),
                   batch=store, heads={"policy": head})  # fmt: skip
    with pytest.raises(RuntimeError, match="response positions differ"):
        form.loss(batch)


def test_the_trainers_loss_has_no_branch_per_form():
    """`compute_loss` is DPO plus ALPHA x `form.loss` plus metrics: no form is named in the trainer's loss path."""
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    for method in ("_compute_loss", "_form_inputs", "_log_form_metrics", "_get_num_items_in_batch"):
        source = inspect.getsource(getattr(PreferenceGuidedDPOTrainer, method))
        named = [name for name in FORMS if f'"{name}"' in source or f"'{name}'" in source]
        assert named == [], f"{method} branches on {named}"


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at the top or inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            deps |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
        graph[module] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circle_in_the_package():
    graph = package_imports()
    assert "preference_dpo.variables" in graph["preference_dpo.checkpoints"]  # the walk sees the imports
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join([*path, dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_a_new_form_is_one_class_and_one_registration(tiny_model_dir, tokenizer, small_data, tmp_path, monkeypatch):
    """A form the trainer has never heard of, registered at run time, trains: its loss is added with ALPHA and
    logged under its name. Its loss here is mean(h_base), so loss(ALPHA 0.5) - loss(ALPHA 0) must be half the
    `margin_base` the trainer logs on its own."""
    import sys
    import types

    from preference_dpo.forms.base import AlignedForm

    from .test_trl_contract import first_batch, make_trainer, perturb_adapter

    class Toy(AlignedForm):
        name = "toy"
        teacher = "policy"

        def loss(self, inputs):
            return inputs.base.margin.mean()

    module = types.ModuleType("preference_dpo.forms.toy")
    module.Toy = Toy
    monkeypatch.setitem(sys.modules, "preference_dpo.forms.toy", module)
    monkeypatch.setitem(FORMS, "toy", "toy:Toy")
    losses = {}
    for alpha in (0.0, 0.5):
        trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path / str(alpha), alpha=alpha,
                               align_loss="toy")  # fmt: skip
        perturb_adapter(trainer)
        batch, _ = first_batch(trainer)
        losses[alpha] = trainer.compute_loss(trainer.model, batch).item()
    metrics = trainer._metrics["train"]
    assert metrics["toy_loss"][-1] == pytest.approx(metrics["margin_base"][-1], abs=1e-5)
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * metrics["margin_base"][-1], abs=1e-4)
    assert metrics["margin_base"][-1] != 0
