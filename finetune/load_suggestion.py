"""Which ``model.load`` rule would make a weights file fit the model.

When a file barely loads (or a strict load fails), the load report names the rule that loads the
most tensors: a prefix to strip, one to add, or both. Candidates come from the keys themselves:
wherever a file key and a model key end the same (from a dot on), the parts before are a
``strip_prefix``/``add_prefix`` pair, so ``0.model.conv1.weight`` vs ``conv1.weight`` gives
``strip_prefix: [0.model.]`` however many parts the prefix has (a fastai ``Learner.save`` file).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import torch

CANDIDATES_TRIED = 12  # the most frequent (strip, add) pairs are counted exactly


def suggest_rule(
    file_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> str | None:
    """One line: the rule that loads the most file tensors into ``target`` (a state_dict) and
    how many it loads; ``None`` when no rule loads more than the file as it is."""
    today = _loads(file_state, target, "", "")
    pairs = Counter(_prefix_pairs(file_state, target))
    best, best_loads = None, today
    for strip, add in sorted(p for p, _ in pairs.most_common(CANDIDATES_TRIED)):
        loads = _loads(file_state, target, strip, add)
        if loads > best_loads:
            best, best_loads = (strip, add), loads
    if best is None:
        return None
    return (
        f"model.load: {{{_rule(*best)}}} would load {best_loads} of the file's "
        f"{len(file_state)} tensors (as it is: {today})"
    )


def key_examples(file_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """When no rule helps: how the keys of both sides look."""
    file_example = next(iter(file_state), "(none)")
    model_example = next(iter(target), "(none)")
    return (
        f"no prefix rule helps: file keys look like {file_example!r}, model keys like "
        f"{model_example!r}; try model.load.rename"
    )


def _prefix_pairs(
    file_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, str]]:
    """``(strip, add)`` for each file key and the model keys that end as it does from a dot on:
    its longest such ending (at least two parts, so that a lone ``weight`` proposes nothing)."""
    prefixes_of: dict[str, set[str]] = {}
    for key in target:
        for prefix, suffix in _splits(key):
            prefixes_of.setdefault(suffix, set()).add(prefix)
    for key in file_state:
        strip, suffix = next(((p, s) for p, s in _splits(key) if s in prefixes_of), ("", ""))
        for add in prefixes_of.get(suffix, ()):
            if (strip, add) != ("", ""):
                yield strip, add


def _splits(key: str) -> Iterator[tuple[str, str]]:
    """``("", "a.b.c")``, ``("a.", "b.c")``: the key cut at each dot, keeping two parts."""
    parts = key.split(".")
    for cut in range(len(parts) - 1):
        yield ".".join(parts[:cut]) + ("." if cut else ""), ".".join(parts[cut:])


def _loads(
    file_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], strip: str, add: str
) -> int:
    """File tensors that land on a model tensor of the same shape under the rule."""
    count = 0
    for key, tensor in file_state.items():
        renamed = add + key.removeprefix(strip)  # as model.load applies them
        if renamed in target and tuple(target[renamed].shape) == tuple(tensor.shape):
            count += 1
    return count


def _rule(strip: str, add: str) -> str:
    parts = ([f"strip_prefix: [{strip}]"] if strip else []) + (
        [f"add_prefix: {add}"] if add else []
    )
    return ", ".join(parts)
