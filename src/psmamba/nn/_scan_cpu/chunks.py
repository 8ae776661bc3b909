"""How the CPU scan kernels cut their work: the time chunk, channel blocks and sync blocks.

Every size that splits a scan lives here, so that each is set in one place (the kernels take
them as arguments, read at call time; tests shrink them with ``monkeypatch``):

* :data:`CHECKPOINT_EVERY`, THE time chunk: training's forward keeps the state every
  ``CHECKPOINT_EVERY`` steps and the backward recomputes one such chunk at a time from it; the
  channels-first inference scan forms ``delta`` and the gate for one such chunk at a time. It
  bounds per-thread buffers (``(K, N)`` floats) and the checkpoint memory ``(B, L/K, E, N)``.
* :data:`SYNC_BUDGET` / :func:`sync_steps`: the backward's steps between thread barriers, a
  multiple of the time chunk.
* :func:`blocks` (channel blocks per batch item, the scan's parallel units) and
  :data:`TM_WIDTH` / :func:`use_time_major` (the time-major inference's units of 16 channels).
* :data:`CONV_STEPS_PER_JOB`: the time-major causal convolution's parallel jobs. Not a time
  chunk of a scan: the convolution has no carried state, any block length gives the same
  numbers; it only sets the work per thread job.

The Mamba layer's own pieces (``mamba_inference_chunk``, ``mamba_train_chunk``) are a different
thing, a memory setting of :mod:`psmamba.runtime`: a piece is a whole scan call, with its state
carried by the layer.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_EVERY",
    "CONV_STEPS_PER_JOB",
    "SYNC_BUDGET",
    "TM_WIDTH",
    "blocks",
    "sync_steps",
    "use_time_major",
]

#: the time chunk (steps): forward checkpoint interval, backward recomputation unit, and the
#: channels-first inference scan's delta/gate buffer length
CHECKPOINT_EVERY = 1024

#: memory for the backward's per-unit dB/dC parts (bytes); sets the steps between barriers
SYNC_BUDGET = 32 * 2**20

#: channels per unit of the time-major inference scan: one AVX-512 vector of float32
TM_WIDTH = 16

#: steps per parallel job of the time-major causal convolution (work granularity only)
CONV_STEPS_PER_JOB = 2048


def sync_steps(every: int, units: int, n: int) -> int:
    """Steps per backward sync block: a multiple of ``every`` whose dB/dC parts (2 sets of
    2 x units x steps x N float32) fit in :data:`SYNC_BUDGET`."""
    per_step = 2 * 2 * units * n * 4
    return every * max(1, SYNC_BUDGET // (per_step * every))


def blocks(e: int, threads: int) -> int:
    """Channel blocks per batch item: a few per thread for balance, several channels per block
    so that a time chunk of B and C is reused from cache by each of them."""
    return max(1, min(e, 2 * threads))


def use_time_major(e: int, batch: int, threads: int) -> bool:
    """Whether inference takes the time-major kernels: only when the channels split into whole
    16-channel vectors (:data:`TM_WIDTH`) and that gives every thread a unit. Otherwise (fewer
    or odd channels, many cores) the channels-first kernels with vectors over the N states are
    faster: a time-major unit narrower than a vector runs scalar."""
    return e % TM_WIDTH == 0 and (e // TM_WIDTH) * batch >= threads
