"""Prune a Hugging Face checkpoint on disk one decoder layer at a time.

:func:`prune_checkpoint` is :func:`fair_pruner.prune` + :func:`fair_pruner.save_pretrained`
for models that do not fit in memory (the usual end of FSDP2 scoring: the book is small, the
model is not). The model is built with its parameters on the meta device; then for each decoder
layer in turn its weights are read from the source safetensors files, the plan's reconstruction
and removals for that layer are applied, the pruned tensors are written to a shard of the output
and the layer goes back to the meta device. The embeddings, final norm and head are written as
one more shard. At most one decoder layer (plus the embeddings and head) is in memory at once.
The output directory is what :func:`fair_pruner.save_pretrained` writes, with the weights split
into ``model-XXXXX-of-YYYYY.safetensors`` files and a ``model.safetensors.index.json``; it loads
with :func:`fair_pruner.from_pretrained` and with stock transformers (``trust_remote_code``).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import FairPrunerError, UnsupportedModelError
from ..scorebook import atomic_write
from ._hf import transformers_module
from .io import INDEX, WEIGHTS
from .layout import find_layout


@contextlib.contextmanager
def parameters_on_meta():
    """While active, every parameter a module registers is moved to the meta device at once
    (buffers stay real: rotary tables etc. are computed in ``__init__`` and are not in the
    checkpoint). The ``torch.empty`` a layer allocates before registering is never written, so
    no weight memory is touched; the initialisers then run on meta tensors (no-ops)."""
    register = nn.Module.register_parameter

    def on_meta(mod, name, param):
        register(mod, name, param)
        if param is not None and param.device.type != "meta":
            mod._parameters[name] = nn.Parameter(param.to("meta"),
                                                 requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(directory: str) -> List[str]:
    """The safetensors files of a Hugging Face checkpoint directory (sharded or not)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(directory, n) for n in names]
    single = os.path.join(directory, WEIGHTS)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{directory} has no {WEIGHTS} or {INDEX}: a Hugging Face "
                            "safetensors checkpoint directory is needed")


def fused_expert_sources(name: str, shape, where: Dict[str, str]):
    """For a fused expert tensor (``...experts.gate_up_proj`` [E, 2I, H] / ``...experts.down_proj``
    [E, H, I]) missing from the checkpoint: a function expert -> the checkpoint tensors whose
    dim-0 concatenation is that expert's slice, if the checkpoint stores them per expert."""
    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith("experts") or len(shape) != 3:
        return None
    options = {"gate_up_proj": [("gate_proj", "up_proj"), ("w1", "w3")],
               "down_proj": [("down_proj",), ("w2",)]}.get(leaf, [])
    for parts in options:
        keys = [f"{prefix}.{{e}}.{part}.weight" for part in parts]
        if all(k.format(e=e) in where for k in keys for e in range(shape[0])):
            return lambda e, keys=keys: [k.format(e=e) for k in keys]
    return None


def checkpoint_reader(directory: str):
    """(name -> file, name -> shape, read(name, index=None)) for a checkpoint directory.
    ``read`` returns the tensor, or the slice ``index`` (a tuple of slices) of it, as a copy the
    process owns: each read opens and closes its own mapping, so the file pages it touched leave
    the resident set (a rank's memory is its tensors, not the part of the file it has read)."""
    from safetensors import safe_open

    where: Dict[str, str] = {}
    shapes: Dict[str, tuple] = {}
    for f in checkpoint_files(directory):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                where[k] = f
                shapes[k] = tuple(h.get_slice(k).get_shape())

    def read(name: str, index: Optional[tuple] = None) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as h:
            t = h.get_tensor(name) if index is None else h.get_slice(name)[index]
            return t.clone()
    return where, shapes, read


def meta_model(directory: str, dtype=None):
    """(model, config): the causal LM of ``directory``'s config built with its parameters on the
    meta device (:func:`parameters_on_meta`), in eval mode; ``dtype`` defaults to the config's."""
    tf = transformers_module()
    config = tf.AutoConfig.from_pretrained(directory)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
            or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with parameters_on_meta():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


def _materialise(model: nn.Module, prefix: str, where, read, directory: str,
                 skip: tuple = ()) -> None:
    """Replace every meta parameter under module ``prefix`` (outside the modules ``skip``, with
    a trailing dot) by its tensor from the checkpoint; tied parameters (one object under several
    names, e.g. a tied LM head) are read once, from whichever of their names the files hold."""
    root = model.get_submodule(prefix) if prefix else model
    slots: Dict[int, list] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for leaf, p in mod._parameters.items():
            full = ".".join(x for x in (prefix, mod_name, leaf) if x)
            if p is None or p.device.type != "meta" or (skip and full.startswith(skip)):
                continue
            slots.setdefault(id(p), []).append((mod, leaf, p, full))
    for entries in slots.values():
        p = entries[0][2]
        names = [e[3] for e in entries]
        hit = next((n for n in names if n in where), None)
        if hit is not None:
            t = read(hit)
        else:
            fused = fused_expert_sources(names[0], p.shape, where)
            if fused is None:
                raise UnsupportedModelError(
                    f"prune_checkpoint: {directory} has no tensor {names[0]!r} (the "
                    "checkpoint's names differ from the model's); load the model whole and use "
                    "fp.prune + fp.save_pretrained")
            t = torch.stack([torch.cat([read(k) for k in fused(e)], dim=0)
                             for e in range(p.shape[0])])
        if tuple(t.shape) != tuple(p.shape):
            raise UnsupportedModelError(f"prune_checkpoint: {names[0]} is {tuple(t.shape)} in "
                                        f"{directory} but {tuple(p.shape)} in the model")
        new = nn.Parameter(t.to(p.dtype), requires_grad=False)
        for mod, leaf, _, _ in entries:
            mod._parameters[leaf] = new


def _to_meta(module: nn.Module) -> None:
    for mod in module.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[leaf] = nn.Parameter(p.detach().to("meta"), requires_grad=False)


def prune_checkpoint(source, plan, out, *, book=None, reconstruct: str = "auto",
                     damp: float = 1e-2, dtype=None, tokenizer=None, expert_merge: bool = False,
                     progress: bool = True) -> str:
    """Write ``source`` (a Hugging Face safetensors checkpoint directory) pruned by ``plan`` to
    ``out``, reading and pruning one decoder layer at a time; returns ``out``.

    ``book`` and ``reconstruct`` as in :func:`fair_pruner.prune` (the default reconstruction
    needs the book). ``dtype`` is the weights' dtype on disk (default: the checkpoint's).
    The result equals ``fp.save_pretrained(fp.prune(model, plan, book=book), out)`` of the whole
    model (tests/test_checkpoint.py), ``expert_merge`` included (each layer's removed experts
    are merged into their kept ones before that layer is pruned).
    """
    from safetensors.torch import save_file

    from .io import config_dict, tensors_for_disk, weights_dtype, write_metadata
    from .reconstruct import check_expert_merge, merge_removed_experts
    from .surgery import (CONFIG_KEY, apply_removals, config_entry, resolve_families,
                          resolve_method)

    tf = transformers_module()
    source, out = os.fspath(source), os.fspath(out)
    if os.path.abspath(source) == os.path.abspath(out):
        raise FairPrunerError("prune_checkpoint: out must differ from source (the source is read "
                              "while the output is written)")
    where, _, read = checkpoint_reader(source)
    model, config = meta_model(source)
    if getattr(config, CONFIG_KEY, None):
        raise FairPrunerError(f"{source} is already a fair_pruner-pruned directory; prune the "
                              "original checkpoint")
    model.name_or_path = source                  # write_metadata copies the tokenizer from here
    if os.path.isfile(os.path.join(source, "generation_config.json")):
        model.generation_config = tf.GenerationConfig.from_pretrained(source)
    fams = resolve_families(model, plan)        # validates the plan before anything is read
    method = resolve_method(reconstruct, book, plan)
    merging = check_expert_merge(fams, plan, book) if expert_merge else []
    dtype = weights_dtype(dtype, model)
    layout = find_layout(model)
    layer_names = [layer.name for layer in layout.layers]
    by_layer: List[Dict[str, object]] = [
        {n: f for n, f in fams.items() if f.name == layer.name or
         f.name.startswith(layer.name + ".")} for layer in layout.layers]
    outside = [n for n in fams if plan.removed.get(n) and not any(n in lf for lf in by_layer)]
    if outside:
        raise UnsupportedModelError(f"prune_checkpoint prunes decoder layers one at a time; "
                                    f"group {outside[0]} is outside them: use fp.prune + "
                                    "fp.save_pretrained on the whole model")
    os.makedirs(out, exist_ok=True)
    n_files = len(layer_names) + 1
    fname = "model-{:05d}-of-{:05d}.safetensors"
    weight_map: Dict[str, str] = {}
    added: List[str] = []
    aliases: Dict[str, str] = {}

    def write(i: int, items) -> None:
        """File ``i`` of the output: the (name, tensor) ``items``, tied tensors once."""
        tensors, tied = tensors_for_disk(items, dtype)
        aliases.update(tied)
        name = fname.format(i + 1, n_files)
        for k in tensors:
            weight_map[k] = name
        atomic_write(os.path.join(out, name),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    from tqdm.auto import tqdm
    for i, (prefix, lf) in enumerate(tqdm(list(zip(layer_names, by_layer)), disable=not progress,
                                          desc="fair_pruner: pruning layers")):
        _materialise(model, prefix, where, read, source)
        merge_removed_experts(model, lf, [n for n in merging if n in lf], plan.removed, book)
        added += apply_removals(model, lf, plan.removed, book, method, damp)
        write(i, model.get_submodule(prefix).state_dict(prefix=prefix + ".").items())
        _to_meta(model.get_submodule(prefix))
    # everything outside the decoder layers: embeddings, final norm, head (tied tensors once)
    inside = tuple(p + "." for p in layer_names)
    _materialise(model, "", where, read, source, skip=inside)
    write(n_files - 1, [(n, t) for n, t in model.state_dict().items()
                        if not n.startswith(inside) and t.device.type != "meta"])
    setattr(model.config, CONFIG_KEY, config_entry(model, added))
    cfg = config_dict(model, dtype)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total, "fair_pruner_aliases": aliases},
             "weight_map": dict(sorted(weight_map.items()))}

    def write_index(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(index, fh, indent=2)
    atomic_write(os.path.join(out, INDEX), write_index)
    write_metadata(model, out, cfg, plan=plan, tokenizer=tokenizer)
    return out
