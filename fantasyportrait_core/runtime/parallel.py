"""Several processes (``torchrun``) on one batch or one video, with ``torch.distributed``.

* :class:`Distributed`: the process group ``torchrun`` describes in its environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for CUDA devices, gloo on
  the CPU; each rank computes on ``cuda:LOCAL_RANK``. ``cli batch`` deals its jobs out over the ranks
  (:mod:`~fantasyportrait_core.runtime.batch`).
* :class:`ParallelRun`: one video on every rank (``cli run --parallel``):

  - ``cfg``: the 2–3 guidance passes of a step (FantasyPortrait §3.4 dual guidance;
    :func:`~fantasyportrait_core.sampling.guidance.guidance_passes`) run on different ranks, pass ``i`` on
    rank ``i mod N``; the velocities are exchanged with one all-gather and every rank combines them
    (:func:`~fantasyportrait_core.sampling.guidance.combine_guidance`) into the same next latent.
  - ``sequence``: the transformer's tokens are split across the ranks with diffusers' context
    parallelism (``ContextParallelConfig``, Ulysses attention: an all-to-all before and after each
    self-attention; ``WanTransformer3DModel._cp_plan`` splits the tokens after the patch embedding
    and gathers them before the output projection). The text/image cross-attention is local; the
    portrait branch of each shard attends, token by token, to its own latent frame's expression
    tokens with the masks sliced to the shard
    (:func:`~fantasyportrait_core.model.attention.sequence_shard`).
  - ``auto``: ``cfg`` when N divides the pass count (2 GPUs with 2 passes, 3 with 3), else
    ``sequence``.

Every rank loads the whole model and samples; rank 0 writes the outputs. Bytes sent per step and
the expected speed-up: docs/SCALING.md.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from fantasyportrait_core.validate import InputError

log = logging.getLogger("FantasyPortrait")

PARALLEL_MODES = ("none", "auto", "cfg", "sequence")
TORCHRUN_HINT = "torchrun --nproc-per-node N -m fantasyportrait_core.cli"


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job.

    Attributes:
        rank, world: global rank and number of processes; local_rank: rank on this machine (its GPU).
        owned: whether this object initialised the default process group (and so destroys it).
    """

    rank: int
    world: int
    local_rank: int
    owned: bool = False
    _gloo = None

    @classmethod
    def from_env(cls, device: str, backend: str | None = None, timeout_s: float | None = None) -> "Distributed | None":
        """The process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1), initialised here when it is
        not yet: ``backend``, else NCCL for a CUDA ``device`` and gloo otherwise. ``None`` for a plain
        single process. ``timeout_s``: how long a collective may wait (a batch's ranks wait for the
        slowest at the end: hours, not torch's default 10-30 minutes).

        Raises:
            InputError: a CUDA device with fewer GPUs on this machine than ``LOCAL_RANK`` needs.
        """
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        owned = False
        cuda = str(device).startswith("cuda")
        if cuda:
            if local >= torch.cuda.device_count():
                raise InputError(f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} "
                                 f"GPU(s); use --nproc-per-node {torch.cuda.device_count()} or fewer")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            from datetime import timedelta

            kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kw)
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owned)

    def device_for(self, device: str) -> str:
        """``cuda`` (or ``cuda:K``) -> ``cuda:LOCAL_RANK``: one GPU per rank; other devices unchanged."""
        return f"cuda:{self.local_rank}" if str(device).startswith("cuda") else device

    def gather_rows(self, rows: list) -> list:
        """Every rank's ``rows`` (picklable objects), concatenated, on every rank (a gloo group, so it
        also works beside NCCL)."""
        import torch.distributed as dist

        if self._gloo is None:
            self._gloo = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        out = [None] * self.world
        dist.all_gather_object(out, rows, group=self._gloo)
        return [r for part in out for r in part]

    def close(self):
        """Destroy the process group when this object made it."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def choose_mode(requested: str, world: int, passes: int, heads: int, whole_sequence: bool = False) -> str:
    """The parallel mode for ``world`` ranks: ``requested`` unless ``auto``, which takes ``cfg`` when
    ``world`` divides the guidance ``passes`` (each rank a whole share of the passes), else
    ``sequence`` when ``world`` divides the attention ``heads`` (Ulysses), else ``cfg``.

    ``whole_sequence``: the model needs statistics over every token of a block (FlashPortrait's
    normalized expression block), so the tokens cannot be split: ``auto`` takes ``cfg``.

    Raises:
        InputError: ``sequence`` with a rank count that does not divide the heads, naming the counts
            that do (the 14B model: 40 heads -> 2, 4, 5, 8, 10...), or ``sequence`` with
            ``whole_sequence``.
    """
    if whole_sequence:
        if requested == "sequence":
            raise InputError("--parallel sequence splits the tokens, but FlashPortrait's normalized expression block "
                             "needs the statistics of all of them: use --parallel cfg (or auto)")
        return "cfg"
    if requested == "auto":
        if passes >= world and passes % world == 0:
            return "cfg"
        return "sequence" if heads % world == 0 else "cfg"
    if requested == "sequence" and heads % world:
        fits = [n for n in range(2, min(heads, 16) + 1) if heads % n == 0]
        raise InputError(f"--parallel sequence splits the {heads} attention heads over the ranks (Ulysses): "
                         f"{world} ranks do not divide them; use --nproc-per-node {' or '.join(map(str, fits))}")
    return requested


class ParallelRun:
    """How one video is split over the ranks of ``group`` (``None``: the default group).

    Attributes:
        mode: ``cfg`` or ``sequence``; rank, world: place in ``group``.
    """

    def __init__(self, mode: str, rank: int, world: int, group=None):
        self.mode, self.rank, self.world, self.group = mode, rank, world, group
        self._sequence_enabled = False

    def __repr__(self):
        return f"ParallelRun({self.mode}, rank {self.rank} of {self.world})"

    # -- cfg ----------------------------------------------------------------------------------
    def share(self, passes: list) -> list:
        """The passes this rank runs: ``passes[rank::world]`` (order as given)."""
        return list(passes[self.rank::self.world])

    def run_passes(self, denoiser, x: torch.Tensor, sigma: float, passes: list) -> dict:
        """Guidance-parallel :meth:`~fantasyportrait_core.model.denoiser.PortraitDenoiser.run_passes`: this rank
        runs its share (:meth:`share`), then one all-gather of ``ceil(P / N)`` float32 velocities
        ``[1, 16, F_lat, h, w]`` per rank gives every rank every pass.

        Returns:
            ``{pass: float32 [1, 16, F_lat, h, w]}`` for all ``passes``, identical on every rank.
        """
        import torch.distributed as dist

        mine = self.share(passes)
        local = denoiser.run_local(x, sigma, mine) if mine else {}
        per_rank = math.ceil(len(passes) / self.world)
        shape = (1,) + tuple(x.shape[1:])
        buf = torch.zeros((per_rank,) + shape, dtype=torch.float32, device=x.device)
        for k, p in enumerate(mine):
            buf[k] = local[p].to(buf.device)
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(gathered, buf, group=self.group)
        return {p: gathered[i % self.world][i // self.world] for i, p in enumerate(passes)}

    # -- sequence -----------------------------------------------------------------------------
    def enable_sequence(self, transformer) -> None:
        """diffusers context parallelism (Ulysses over all ranks) on ``transformer``, once.

        The same steps as diffusers' ``ModelMixin.enable_parallelism`` (which on a CPU-only torch
        divides by ``torch.accelerator.device_count()``, 0 there, so the gloo tests could not call
        it): on CUDA that method is called; on the CPU the mesh is built here on ``"cpu"`` and the same
        configuration and hooks (``apply_context_parallel`` with the model's ``_cp_plan``) applied.

        Raises:
            ValueError: from diffusers, e.g. an attention backend without context parallelism.
        """
        if self._sequence_enabled:
            return
        from diffusers import ContextParallelConfig

        config = ContextParallelConfig(ulysses_degree=self.world)
        device = next(transformer.parameters()).device
        if device.type == "cuda" or torch.accelerator.device_count() > 0:
            transformer.enable_parallelism(config=config)
        else:
            from diffusers.hooks.context_parallel import apply_context_parallel
            from diffusers.models._modeling_parallel import ParallelConfig
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=("ring", "ulysses"))
            full = ParallelConfig(context_parallel_config=config)
            full.setup(self.rank, self.world, torch.device("cpu"), mesh=mesh)
            transformer._parallel_config = full
            for module in transformer.modules():
                processor = getattr(module, "processor", None)
                if processor is not None and hasattr(processor, "_parallel_config"):
                    processor._parallel_config = full
            apply_context_parallel(transformer, config, transformer._cp_plan)
        self._sequence_enabled = True

    def check_tokens(self, tokens: int, what: str) -> None:
        """Sequence mode splits ``tokens`` evenly over the ranks.

        Raises:
            InputError: naming the token count and the rank count.
        """
        if self.mode == "sequence" and tokens % self.world:
            raise InputError(f"--parallel sequence: {what} has {tokens} tokens, which {self.world} ranks cannot split "
                             f"evenly; change --max-size or --frames a little, or use --parallel cfg")


def setup_parallel(models, requested: str, dist: Distributed, job) -> ParallelRun:
    """Put ``models`` in ``requested`` parallel mode over all ranks of ``dist`` (``auto`` resolved by
    :func:`choose_mode` from the job's most guidance passes and the transformer's heads); sequence
    mode enables diffusers' context parallelism here, before sampling.

    Returns:
        The :class:`ParallelRun`, also set as ``models.parallel`` and ``models.state.parallel``.
    """
    from fantasyportrait_core.sampling.guidance import guidance_passes

    if getattr(models, "transformer_2", None) is not None:
        raise InputError("--parallel does not split Wan2.2's two experts yet: run Wan2.2 on one GPU per video "
                         "(torchrun ... batch shares whole jobs across GPUs)")
    s = job.sampling.resolve()
    passes = len(guidance_passes(s.cfg, s.portrait_cfg))
    heads = models.transformer.config.num_attention_heads
    mode = choose_mode(requested, dist.world, passes, heads,
                       whole_sequence=getattr(models.adapter, "normalize_expression", False))
    run = ParallelRun(mode, dist.rank, dist.world)
    if mode == "cfg" and passes < dist.world:
        log.warning("[FantasyPortrait] --parallel cfg: %d guidance pass(es) on %d ranks; %d rank(s) wait each step "
                    "(--parallel sequence uses them all)", passes, dist.world, dist.world - passes)
    if mode == "sequence":
        run.enable_sequence(models.transformer)
    models.parallel = run
    models.state.parallel = run
    log.info("[FantasyPortrait] %s", run)
    return run


__all__ = ["Distributed", "PARALLEL_MODES", "ParallelRun", "TORCHRUN_HINT", "choose_mode", "setup_parallel"]
