"""A module trained whole beside the adapter: PEFT's ``modules_to_save``.

A new classification head, say, is trained whole rather than adapted. As in
PEFT (``peft.utils.other.ModulesToSaveWrapper``), the module is not trained in
place: :class:`ModuleToSave` keeps the original, frozen, and trains a copy of
it. So switching the adapter off (:func:`~lora_tutorial.inject.disable_adapter`)
or unloading it without merging gives the base model back, and a weight the
original shares with another module (GPT-2 ties ``lm_head`` to the input
embedding) is never changed by training the copy.

The layout is PEFT's, so the state-dict keys are too: ``original_module.*``
and ``modules_to_save.default.*``; an adapter file stores the copy's state
under the module's own name (``score.weight``), as PEFT saves it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from torch import nn

__all__ = ["ModuleToSave"]

#: The one adapter name this library uses, PEFT's default (it appears in state-dict keys).
ADAPTER_NAME = "default"


class ModuleToSave(nn.Module):
    """The original module, frozen, and a trained copy of it that the forward pass uses.

    Args:
        module: the module to train whole. It is kept as ``original_module``
            (not copied, and not changed here: :func:`~lora_tutorial.inject.add_lora`
            freezes it); ``trained`` is a deep copy, every parameter trainable.

    Attribute reads the wrapper does not answer itself go to the module in
    use (``wrapper.weight`` is the trained copy's weight), as in PEFT.

    Shapes:
        whatever ``module`` takes and returns.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        containers = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
        if isinstance(module, containers) or isinstance(module, ModuleToSave):
            raise TypeError(
                f"module must be a module with a forward pass, got a {type(module).__name__} "
                "(PEFT refuses it too)")
        trained = copy.deepcopy(module).requires_grad_(True)
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({ADAPTER_NAME: trained})
        self._adapter_enabled = True

    @property
    def trained(self) -> nn.Module:
        """The copy that trains and that the forward pass uses."""
        return self.modules_to_save[ADAPTER_NAME]

    @property
    def active(self) -> nn.Module:
        """The module that the forward pass uses (``trained``, or ``original_module`` while disabled)."""
        return self.trained if self._adapter_enabled else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The trained copy's forward pass (the original's while disabled)."""
        return self.active(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["ModuleToSave"]:
        """Within this context the original module computes, as in the base model."""
        previous, self._adapter_enabled = self._adapter_enabled, False
        try:
            yield self
        finally:
            self._adapter_enabled = previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules", {})
        if "original_module" not in modules or "modules_to_save" not in modules:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        if self.__dict__.get("_adapter_enabled", True):
            return getattr(modules["modules_to_save"][ADAPTER_NAME], name)
        return getattr(modules["original_module"], name)

    def extra_repr(self) -> str:
        return "trains a copy; original_module is kept frozen"
