"""Training state (optimizer, schedule, loss scale, random generators, loop counters) as data:
tensors in a safetensors file, everything else in JSON. Nothing in either file can make us
import or run code, unlike a pickle (``torch.save``).

A state is a tree of dicts, lists, tuples, numbers, strings, ``None`` and tensors, as torch's
``state_dict()`` methods return it. ``split_tensors`` swaps every tensor for a reference and
encodes what JSON cannot hold (tuples, dicts with non-string keys, infinite floats), and
``join_tensors`` puts the tree back together exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.weights import read_safetensors, write_safetensors

TENSOR, TUPLE, ITEMS, FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"
JSON_SHA256 = "finetune_state_json_sha256"  # in the tensors file: the JSON text's checksum


def split_tensors(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``tree`` with each tensor moved into ``tensors`` (under its path) and a reference left."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(tree, dict):
        if all(isinstance(key, str) for key in tree):
            return {
                key: split_tensors(value, tensors, f"{path}.{key}") for key, value in tree.items()
            }
        return {
            ITEMS: [
                [
                    split_tensors(key, tensors, f"{path}.k{i}"),
                    split_tensors(value, tensors, f"{path}.{i}"),
                ]
                for i, (key, value) in enumerate(tree.items())
            ]
        }
    if isinstance(tree, (list, tuple)):
        items = [split_tensors(value, tensors, f"{path}.{i}") for i, value in enumerate(tree)]
        return {TUPLE: items} if isinstance(tree, tuple) else items
    if isinstance(tree, float) and not math.isfinite(tree):
        return {FLOAT: repr(tree)}  # 'inf', '-inf', 'nan': JSON has no literal for them
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"training state holds a {type(tree).__name__} at {path!r}: not data")


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split_tensors``."""
    if isinstance(tree, dict):
        if TENSOR in tree:
            return tensors[tree[TENSOR]]
        if TUPLE in tree:
            return tuple(join_tensors(value, tensors) for value in tree[TUPLE])
        if ITEMS in tree:
            return {
                join_tensors(key, tensors): join_tensors(value, tensors)
                for key, value in tree[ITEMS]
            }
        if FLOAT in tree:
            return float(tree[FLOAT])
        return {key: join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(value, tensors) for value in tree]
    return tree


def write_state(
    folder: Path, state: dict[str, Any], *, tensors_file: str, json_file: str
) -> list[Path]:
    """Write ``state`` as ``folder/tensors_file`` + ``folder/json_file``; the paths written.

    The tensors file's checksum also covers the JSON text, so the pair is read back only as it
    was written."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(split_tensors(state, tensors), allow_nan=False) + "\n"
    write_safetensors(tensors, folder / tensors_file, {JSON_SHA256: _sha256(text)})
    (folder / json_file).write_text(text)
    return [folder / tensors_file, folder / json_file]


def read_state(folder: Path, *, tensors_file: str, json_file: str) -> dict[str, Any]:
    """What ``write_state`` wrote; a damaged or altered file is a ``UserError`` naming it."""
    try:
        text = (folder / json_file).read_text()
    except OSError as error:
        raise UserError(f"{folder / json_file}: cannot read the training state ({error})") from None
    tensors, metadata = read_safetensors(folder / tensors_file)  # its own checksum verified
    if metadata.get(JSON_SHA256) != _sha256(text):
        raise UserError(
            f"{folder / json_file}: damaged or altered: it does not match the checksum recorded "
            f"in {tensors_file} when the checkpoint was written"
        )
    try:
        state = join_tensors(json.loads(text), tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{folder / json_file}: not a training state ({error!r})") from None
    if not isinstance(state, dict):
        raise UserError(f"{folder / json_file}: not a training state")
    return state


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
