"""Which Linears each model family calls its attention and MLP projections, by the model
config's `model_type`, so that the method presets' roles `attention` and `mlp` (in
method.target_modules and method.dense_targets) adapt the same parts of every family: Llama's
q/k/v/o and gate/up/down, Phi-3's fused qkv_proj and gate_up_proj, GLM's fused gate_up_proj.

Every family here is trained, exported and reloaded on a tiny random-weight checkpoint
(tests/test_families.py, tests/test_family_runs.py). Other model types take Linear names.
"""

from __future__ import annotations

ROLES = ("attention", "mlp")

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_FUSED_MLP = ("gate_up_proj", "down_proj")
_LLAMA_LIKE = {"attention": _ATTENTION, "mlp": _MLP}
_GLM = {"attention": _ATTENTION, "mlp": _FUSED_MLP}

# model_type -> role -> the Linear names (suffixes of the module paths) that play it.
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": {"attention": ("qkv_proj", "o_proj"), "mlp": _FUSED_MLP},
    "glm": _GLM,  # GLM-4-9B-chat-hf (transformers-native GlmForCausalLM)
    "glm4": _GLM,  # GLM-4-0414 (Glm4ForCausalLM)
}


def uses_roles(names: list[str]) -> bool:
    return any(name in ROLES for name in names)


def resolve_roles(
    fields: dict[str, list[str]], model_type: str | None, linear_names: list[str]
) -> dict[str, list[str]]:
    """Each config field's names (`{"method.target_modules": [...]}`) with every role replaced
    by the family's Linear names; other names stay as given.

    Raises:
        ValueError: a role is asked for on a model type not in FAMILIES; the message names the
            fields to set and the model's Linear names to set them to.
    """
    with_roles = {key: names for key, names in fields.items() if uses_roles(names)}
    family = FAMILIES.get(model_type or "")
    if with_roles and family is None:
        asked = " and ".join(f"{key}={list(names)}" for key, names in with_roles.items())
        some = f" (some of {linear_names})" if linear_names else ""
        raise ValueError(
            f"{asked} name{'s' if len(with_roles) == 1 else ''} the roles {'/'.join(ROLES)}, "
            f"which moelora knows only for the model types {', '.join(sorted(FAMILIES))}, not "
            f"for {model_type!r}; set {' and '.join(with_roles)} to this model's Linear names "
            f"instead{some}."
        )
    return {key: _expand(names, family or {}) for key, names in fields.items()}


def _expand(names: list[str], family: dict[str, tuple[str, ...]]) -> list[str]:
    resolved: list[str] = []
    for name in names:
        for target in family.get(name, (name,)):
            if target not in resolved:
                resolved.append(target)
    return resolved
