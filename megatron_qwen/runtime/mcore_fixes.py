"""Fixes for megatron-core bugs that break checkpointing with its distributed optimizer.

Without TransformerEngine or Apex (always so on CPU, and on a GPU installed as the README says),
megatron-core's ``DistributedOptimizer`` wraps ``torch.optim.AdamW``, and three of its calls
mishandle that optimizer's per-parameter ``step`` state, so a run with
``--use-distributed-optimizer`` could neither resume nor keep an exact step count. The bugs are
megatron-core's, not the CPU's, so ``apply()`` patches them on every device: ``init_distributed``,
``world_of_one`` and ``training.optimizer.build_optimizer`` call it. It is idempotent, patches only
the megatron-core versions in ``AFFECTED`` (the ones read and tested here: the three bugs are the
same code in 0.16.1, 0.17.0, 0.18.0 and 0.19.2; the tests run on 0.16.1 and 0.19.2), and every
wrapper passes
through untouched for any other inner optimizer (TE / Apex FusedAdam keep ``step`` in their
param groups, not per parameter).
"""

from __future__ import annotations

import functools

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_qwen.runtime import mcore_version

# Read in 0.16.1-0.19.2 (the versions setup.py allows); check again before widening.
AFFECTED = SpecifierSet(">=0.16,<0.20")
_MARK = "__megatron_qwen_fix__"
_applied = False


def is_affected(version: Version | None = None) -> bool:
    return (version or mcore_version.version()) in AFFECTED


def is_applied() -> bool:
    return _applied


def _is_torch_adam(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)


def _zero_state_for_fresh_adam(state_dict):
    """``DistributedOptimizer.state_dict`` (distrib_optimizer.py, 0.16.1 l.642, 0.19.2 l.839) asserts that all
    AdamW states share one ``step``; before the first step there is no state, so the assert fails
    and ``sharded_state_dict(is_loading=True)`` (every resume) raises. Give an untouched AdamW the
    zero state torch itself creates at its first step (step 0, zero moments): nothing changes
    numerically."""

    @functools.wraps(state_dict)
    def wrapped(self):
        inner = self.optimizer
        if _is_torch_adam(inner):
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                              exp_avg_sq=torch.zeros_like(p))
        return state_dict(self)

    return wrapped


def _own_step_tensor_per_parameter(load_state_dict):
    """``DistributedOptimizer.load_state_dict`` (0.16.1 l.825, 0.19.2 l.1032) gives every
    parameter's AdamW state one shared ``step`` tensor; AdamW increments it in place once per
    parameter, so after the first resumed step the bias correction is wrong. Give each parameter its own tensor holding
    the step the checkpoint's param groups record."""

    @functools.wraps(load_state_dict)
    def wrapped(self, state_dict):
        load_state_dict(self, state_dict)
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) == 1 and _is_torch_adam(self.optimizer):
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step)

    return wrapped


def _skip_step_in_parameter_copy(set_states):
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.1 l.940, 0.19.2 l.1225)
    copies every key of the AdamW state from the loaded tensors, but
    ``load_parameter_state_from_fully_reshardable`` leaves out ``step``, which ``load_state_dict``
    already set from the param groups: KeyError 'step' on every resume. Copy the other keys;
    ``step`` stays as loaded."""

    @functools.wraps(set_states)
    def wrapped(self, model_param, tensors):
        if ("step" in tensors or not _is_torch_adam(self.optimizer)
                or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return wrapped


def _without_autograd(load_dp_reshardable):
    """``DistributedOptimizer.load_parameter_state_from_dp_reshardable`` (0.16.1 l.1772, 0.19.2
    l.2061) lacks the ``torch.no_grad()`` its fully_reshardable twin has; with fp32 parameters the
    main param it copies into is a view of the model's leaf parameter, so every dp_reshardable
    resume of an fp32 run raises "a view of a leaf Variable that requires grad is being used in an
    in-place operation" (bf16 runs copy into a detached fp32 master and pass). Run it without
    autograd: the copy is the same."""

    @functools.wraps(load_dp_reshardable)
    def wrapped(self, state_dict):
        with torch.no_grad():
            return load_dp_reshardable(self, state_dict)

    return wrapped


_FIXES = {
    "state_dict": _zero_state_for_fresh_adam,
    "load_state_dict": _own_step_tensor_per_parameter,
    "_set_main_param_and_optimizer_states": _skip_step_in_parameter_copy,
    "load_parameter_state_from_dp_reshardable": _without_autograd,
}


def apply() -> bool:
    """Patch megatron-core's DistributedOptimizer where this version has the bugs (any device).
    Returns True when the fixes are in place."""
    global _applied
    if _applied:
        return True
    if not is_affected():
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for name, fix in _FIXES.items():
        original = getattr(DistributedOptimizer, name)
        if not getattr(original, _MARK, False):
            patched = fix(original)
            setattr(patched, _MARK, True)
            setattr(DistributedOptimizer, name, patched)
    _applied = True
    return True
