"""Reward models on their own ranks (``reward.ranks = N``): the last N ranks only score, the others only generate.

A generating rank rolls out its prompt groups one at a time and sends each group's images to its scorer as soon as
they are decoded, then samples the next group while the scorer works on the previous one; the scores come back
before the update. Messages (point-to-point, in order, so no tags are needed):

    generator -> scorer   header (3,) int64: [iteration, prompt index, 0], then images (G, H, W, 3) float32
                          at the end: header [-1, final_save, 0]
    scorer -> generator   scores (R, G) float32 in ``reward_names`` order, then seconds (R,) float32

Every collective of the generators (gradient averaging, logging) runs in their own process group; the scorers
take part only in the world barriers of checkpoint saves, which they mirror from the iteration count.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import DistInfo
from .ippo import PromptGroup
from .rewards import Reward, RewardInputs, RewardResult, compute_rewards, repeat_per_image


@dataclass(frozen=True)
class Roles:
    """Who generates and who scores. Generator ``i`` (0-based among generators) talks to ``scorers[i % N]``."""

    generators: tuple[int, ...]
    scorers: tuple[int, ...]

    @classmethod
    def split(cls, world_size: int, reward_ranks: int) -> Roles:
        if not 0 <= reward_ranks < world_size:
            raise ValueError(f"reward.ranks = {reward_ranks} leaves no generating rank in a world of {world_size}; "
                             f"use 0 (every rank scores its own images) up to {world_size - 1}")
        cut = world_size - reward_ranks
        return cls(tuple(range(cut)), tuple(range(cut, world_size)))

    def scorer_of(self, rank: int) -> int:
        return self.scorers[self.generators.index(rank) % len(self.scorers)]

    def clients_of(self, rank: int) -> list[int]:
        return [g for g in self.generators if self.scorer_of(g) == rank]


def image_shape(group: PromptGroup, group_size: int) -> tuple[int, int, int, int]:
    """(G, H, W, 3) of a group's decoded images: the Flux VAE (and the tiny decoder) upsample latents 8x."""
    _, h, w = group.conditioning.latent_shape
    return (group_size, 8 * h, 8 * w, 3)


class RemoteScorer:
    """A generating rank's end of the protocol: ``submit`` each group as soon as it is decoded, ``collect`` all."""

    def __init__(self, scorer: int, reward_names: Sequence[str], group_size: int, device: torch.device) -> None:
        self.scorer, self.names, self.group_size = scorer, list(reward_names), group_size
        self.device = device  # where messages live: CUDA under NCCL, CPU under gloo
        self.pending: list[object] = []
        self.count = 0

    def submit(self, iteration: int, prompt_index: int, images: Tensor) -> None:
        header = torch.tensor([iteration, prompt_index, 0], dtype=torch.int64, device=self.device)
        payload = images.detach().float().to(self.device).contiguous()
        self.pending += [dist.isend(header, self.scorer), dist.isend(payload, self.scorer), header, payload]
        self.count += 1

    def collect(self) -> RewardResult:
        """Scores of every submitted group, in submission order (B = groups · G)."""
        scores, seconds = [], torch.zeros(len(self.names))
        for _ in range(self.count):
            part = torch.zeros(len(self.names), self.group_size, device=self.device)
            took = torch.zeros(len(self.names), device=self.device)
            dist.recv(part, self.scorer)
            dist.recv(took, self.scorer)
            scores.append(part.cpu())
            seconds += took.cpu()
        for work in self.pending[0::4] + self.pending[1::4]:
            work.wait()
        self.pending, self.count = [], 0
        merged = torch.cat(scores, 1)  # (R, B)
        return RewardResult({n: merged[i] for i, n in enumerate(self.names)},
                            {n: float(seconds[i]) for i, n in enumerate(self.names)})

    def finish(self, final_save: bool) -> None:
        dist.send(torch.tensor([-1, int(final_save), 0], dtype=torch.int64, device=self.device), self.scorer)


def serve_rewards(rewards: Mapping[str, Reward], prompts: Sequence[PromptGroup], group_size: int,
                  groups_per_rank: int, roles: Roles, info: DistInfo, start_step: int, save_every: int) -> None:
    """A scoring rank's loop: each iteration, score every group of each of its generators in turn (sending the
    scores back without waiting), until every generator has said it is done; join the checkpoint barriers the
    generators take (every ``save_every`` iterations, and the final save they announce)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the generators decide when the run stops
    try:
        names = sorted(rewards)
        clients = roles.clients_of(info.rank)
        step, done, final_save = start_step, set(), False
        while True:
            pending = []
            for client in clients:
                for _ in range(groups_per_rank):
                    header = torch.zeros(3, dtype=torch.int64, device=info.device)
                    dist.recv(header, client)
                    if int(header[0]) < 0:  # only ever the first message of an iteration
                        done.add(client)
                        final_save = bool(header[1])
                        break
                    group = prompts[int(header[1])]
                    images = torch.zeros(image_shape(group, group_size), device=info.device)
                    dist.recv(images, client)
                    inputs = RewardInputs(images, repeat_per_image([group.prompt], group_size),
                                          repeat_per_image([group.subjects], group_size),
                                          repeat_per_image([group.layout], group_size))
                    result = compute_rewards({n: rewards[n] for n in names}, inputs)
                    scores = torch.stack([result.scores[n] for n in names]).float().to(info.device).contiguous()
                    seconds = torch.tensor([result.seconds[n] for n in names], dtype=torch.float32, device=info.device)
                    pending += [dist.isend(scores, client), dist.isend(seconds, client), scores, seconds]
            for work in pending[0::4] + pending[1::4]:
                work.wait()
            if done:  # generators stop together (same max_steps, SIGTERM from torchrun to all)
                break
            step += 1
            if save_every and step % save_every == 0:
                dist.barrier()
        if final_save:
            dist.barrier()
        dist.barrier()  # the generators' final barrier
    finally:
        signal.signal(signal.SIGTERM, previous)
