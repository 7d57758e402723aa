"""Lightning's FSDP strategy, allowed on the CPU.

Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` (an exact type check in its accelerator
connector) and wraps with ``device_id=root_device.index``, which is ``None`` on the CPU, where torch's FSDP
then looks for an accelerator. torch's FSDP itself shards and trains on the CPU over gloo when given
``device_id=cpu``. A third difference: Lightning gathers full checkpoints with ``offload_to_cpu=True,
rank0_only=True``, which on the CPU (where "offloading" is no copy) hands rank 1 freed memory and
segfaults it in ``state_dict()``; here every rank gathers the full state without offloading. Nothing else
changes, so ``trainer=fsdp_cpu`` runs the FSDP code path a GPU run takes — wrapping, sharded steps,
checkpoints, the full-state gather before rank 0 evaluates and saves — on a laptop or in CI.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from torch.nn import Module


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that Lightning lets run on ``accelerator="cpu"`` (process group backend: gloo)."""

    strategy_name = "fsdp_cpu"

    def _setup_model(self, model: Module) -> Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # Lightning's own wrapping with device_id=cpu; it then only sets up activation checkpointing
            kwargs = dict(self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied here: Lightning would warn it is ignored
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **kwargs,
            )
        return super()._setup_model(model)

    def _full_state_on_cpu(self) -> AbstractContextManager | None:
        """FSDP's full state dict context without offloading, on every rank; None where Lightning's own is fine."""
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return None
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        context = self._full_state_on_cpu()
        if context is None:
            return super().lightning_module_state_dict()
        with context:
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        context = self._full_state_on_cpu()
        if context is None:
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with context:  # keyed by parameter id, the standard format Lightning's own full checkpoints use
            return FSDP.rekey_optim_state_dict(
                FSDP.optim_state_dict(self.model, optimizer), OptimStateKeyType.PARAM_ID, self.model
            )
