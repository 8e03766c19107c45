"""What a checkpoint of the module holds: its state without what is reloaded from ``model_path``.

The reference is the initial actor, and with LoRA the actor's frozen base weights are those of
``model_path`` too: storing them would only grow every checkpoint (a LoRA checkpoint holds the
adapters and their AdamW state). Leaving them out of ``state_dict`` — not only of the saved file —
matters under FSDP2, where Lightning reads a checkpoint folder by the module's state keys.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ModelPathState"]


class ModelPathState(nn.Module):
    """A mixin for the LightningModule: ``state_dict`` leaves out the reference (``reference.*``) and
    the actor's frozen parameters (``_frozen_actor_keys``, set when the models are built), and
    ``load_state_dict`` keeps their values from ``model_path``."""

    _frozen_actor_keys: frozenset[str] = frozenset()

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The module's state without what is reloaded from ``model_path`` (:meth:`_from_model_path`):
        what checkpoints hold. (Under FSDP2 Lightning also reads a checkpoint folder by these keys.)"""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and self._from_model_path(k[len(prefix):])]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint's state; the entries :meth:`state_dict` leaves out keep the values loaded
        from ``model_path``. ``strict`` holds for every other entry."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not self._from_model_path(key)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint's state does not fit this module (model.lora set one way when saved, the other now?): "
                f"{len(missing)} entries missing {missing[:3]}, {len(result.unexpected_keys)} unexpected "
                f"{result.unexpected_keys[:3]}"
            )
        return result

    def _from_model_path(self, key: str) -> bool:
        """Whether a state entry is reloaded from ``model_path``, never stored: the reference (the initial
        actor) and the actor's frozen parameters (with LoRA, the base weights under the adapters)."""
        return key.startswith("reference.") or key in self._frozen_actor_keys

