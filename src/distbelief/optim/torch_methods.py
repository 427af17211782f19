"""torch.optim.Optimizer's own methods as a DownpourSGD has them: its state dict (with its
step count), the checks of the groups it loads and of the groups added, and the refusal to be
pickled or copied; torch's methods run without their compiler guard (unguarded.py).
A mixin of DownpourSGD: it never talks to the shards.
"""

from __future__ import annotations

from distbelief.config import check_count
from distbelief.optim.param_checks import check_param_groups
from distbelief.unguarded import call_unguarded


class TorchOptimizerMethods:
    """Overrides of torch.optim.Optimizer's methods; placed before it among DownpourSGD's
    bases, so that ``super()`` here is torch's Optimizer."""

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles (and deep-copies) only its groups and state: the copy would
        # have no connections to the shards. Refused, as a socket is.
        raise TypeError(
            "cannot pickle or copy a DownpourSGD: it holds connections to the shards; save "
            "its state_dict() and make a new optimizer"
        )

    # torch's own methods, without the compiler guard that imports torch._dynamo on first use
    # (unguarded.py): a worker that never compiles starts without it.
    def add_param_group(self, param_group: dict) -> None:
        """As torch's, while the constructor gathers the groups; afterwards refused: the shards
        hold the parameters given then, and later ones would train only here.

        Raises:
            ValueError: called after the constructor.
        """
        if getattr(self, "specs", None) is not None:
            raise ValueError(
                "add_param_group: the shards hold the parameters given to DownpourSGD(); "
                "make a new optimizer with every parameter group"
            )
        call_unguarded("add_param_group", self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: resets the parameters' gradients (to None, or to zero)."""
        call_unguarded("zero_grad", self, set_to_none)

    def state_dict(self) -> dict:
        """As torch's, with a ``downpour`` entry: the step count, ``n_push`` and ``n_pull``."""
        state = call_unguarded("state_dict", self)
        state["downpour"] = {
            "num_steps": self.num_steps,
            "n_push": self.n_push,
            "n_pull": self.n_pull,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, checking the groups it loads as the constructor does (one saved by
        torch.optim.SGD with momentum, say, would otherwise train without it), after the
        ``register_load_state_dict_pre_hook`` hooks, which may adapt them. The step count is
        this optimizer's own: loaded from a DownpourSGD state dict, kept from a torch.optim one
        (its pushes and pulls stay on schedule, its clock at the shards does not go back). A
        DownpourSGD state dict saved earlier takes the count back: the steps done again from it
        are pushed as any new step is.

        Raises:
            ValueError: a loaded group's ``lr`` or other setting DownpourSGD does not apply,
                named by its index, or a step count that is no integer >= 0; nothing is
                loaded.
        """
        state_dict = dict(state_dict)
        downpour = state_dict.pop("downpour", None) or {}
        if not isinstance(downpour, dict):
            raise ValueError(
                f"state_dict['downpour'] must be a dict (a DownpourSGD state dict's), got "
                f"{type(downpour).__name__}"
            )
        num_steps = downpour.get("num_steps", self.num_steps)
        check_count("state_dict['downpour']['num_steps']", num_steps, least=0)
        self._loading_num_steps = num_steps
        try:
            call_unguarded("load_state_dict", self, state_dict)
        finally:
            del self._loading_num_steps

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict hands the loaded groups here, after its pre hooks and before
        # anything has changed: the one place to check what it would load.
        check_param_groups(state["param_groups"])
        super().__setstate__(state)
        loading = self.__dict__.get("_loading_num_steps")
        if loading is not None:  # with the groups, before torch's post hooks: they see it
            self._take_step_count(loading)
