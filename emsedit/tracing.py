"""Capture keys and value-gradients of edited modules at answer positions (spec §6.2).

Usage::

    with Tracer(modules) as tracer:
        logits = model(input_ids=..., attention_mask=...).logits
        loss = cross_entropy(logits, labels)
        keys, grads = tracer.keys_and_grads(loss, labels != -100)

``keys[name]`` are the module's inputs and ``grads[name]`` the gradients of the loss with respect
to the module's output, both at the masked positions, detached, in float32. The hooks are always
removed when the ``with`` block exits, also on error. Gradients are taken with ``torch.autograd.grad``
on the module outputs, so the edited weights' ``.grad`` is left untouched.
"""

from __future__ import annotations

import torch
from torch import nn


class Tracer:
    """Context manager hooking the forward pass of the given modules."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "Tracer":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._outputs.clear()

    def _hook(self, name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._inputs[name] = inputs[0].detach()
            self._outputs[name] = output

        return record

    def keys_and_grads(
        self, loss: torch.Tensor, mask: torch.Tensor | tuple[torch.Tensor, ...]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Back-propagate ``loss`` to the hooked outputs and gather rows at ``mask`` positions (a
        boolean mask over the outputs' leading dimensions, or an index tuple into them)."""
        names = list(self.modules)
        missing = [n for n in names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"the forward pass did not reach the edited modules {missing}")
        grads = torch.autograd.grad(loss, [self._outputs[n] for n in names])
        keys = {n: self._inputs[n][mask].float() for n in names}
        values = {n: g[mask].float() for n, g in zip(names, grads)}
        return keys, values
