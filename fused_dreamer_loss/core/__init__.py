"""What every fused loss family shares; a family imports this package, never another family.

- :mod:`.machinery`: the fused-loss machinery (imports triton): the fixed-order finalize kernel,
  ``FusedLossFunction`` (the autograd contract), the ``torch.library`` custom ops, tile helpers,
  the plans' shared part (``TunedPlan``) and their launches (``Launch``: direct after the
  first).
- :mod:`.dispatch`: which backend runs a call, and the import of a family's kernels.
- :mod:`.validation`: argument checks every family uses (dtypes, backends, options).
- :mod:`.torchrl_module`: the torchrl ``LossModule`` base, tensordict key handling, torchrl's dtypes.
- :mod:`.math`: symlog / symexp and the two-hot encoding with its cross-entropy, in pure torch.

Nothing here imports triton but :mod:`.machinery`, which only the families' kernel modules import.
"""
