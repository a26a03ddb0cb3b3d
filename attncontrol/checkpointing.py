"""Gradient checkpointing of the guidance forward (``GuidanceEngine(..., checkpointing=True)``).

The modules the adapter names (``checkpoint_modules``: for SD-family denoisers, the layers of the blocks that run
entirely before the last captured layer) are run under ``torch.utils.checkpoint``
(non-reentrant) during a guidance pass, so their intermediate activations are not kept for the backward but
recomputed from each module's inputs when the backward reaches it. Results are the same (the recompute runs the
same code on the same inputs); a pass costs one extra forward of those modules. Per layer rather than per block:
on the full-size SD 1.5 denoiser at 512 px that keeps less at once (the recompute of one layer, not of a whole
block) for the same time.

The recompute happens inside the backward, after the guidance forward has switched ``store.active`` off. The
capture processors would then take the ordinary (SDPA) path and recompute other tensors than the forward
saved. So the recompute is replayed in the forward's mode: ``store.active`` on, as in the forward, and
the store's ``replaying`` flag set, so that it keeps exactly the maps (and graph) of the forward and holds no
reference to the recomputed tensors. The block that holds the last captured layer (where the forward stops
with :class:`~attncontrol.store.EarlyExit`) is never checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


@contextmanager
def _replaying(store) -> Iterator[None]:
    """The capture processors' forward mode, keeping nothing: for the recompute inside the backward. The store
    still runs the same operations as in the forward (the recompute must save the same tensors), but drops them."""
    active, early_exit, replaying = store.active, store.early_exit, store.replaying
    store.active, store.early_exit, store.replaying = True, False, True
    try:
        yield
    finally:
        store.active, store.early_exit, store.replaying = active, early_exit, replaying


def _checkpointed_forward(forward, store):
    def wrapper(*args, **kwargs):
        calls = []

        def run(*a, **k):
            if not calls:  # the forward itself
                calls.append(True)
                return forward(*a, **k)
            with _replaying(store), torch.profiler.record_function("attncontrol::recompute"):
                return forward(*a, **k)  # the recompute, from the backward

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapper


@contextmanager
def checkpointing(modules: list[torch.nn.Module], store) -> Iterator[None]:
    """Run ``modules`` under non-reentrant gradient checkpointing while the context is open (one guidance
    forward). Their ``forward`` is restored on exit; the recompute in a later backward still works (it holds its
    own reference to the original forward). None of ``modules`` may hold the store's last layer."""
    patched = []
    try:
        for module in modules:
            if "forward" in vars(module):
                raise RuntimeError(f"{type(module).__name__} already has an instance-level forward; not patching it")
            module.forward = _checkpointed_forward(module.forward, store)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
