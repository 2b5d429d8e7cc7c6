"""Regularizers: a term added to each task's loss inside the step (`regularizer` group).

`Regularizer` is the `none` option: the loss as it is. `Smart` is SMART (Jiang et al.
2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models
through Principled Regularized Optimization"), written after MT-DNN's implementation
(github.com/namisan/mt-dnn, `mt_dnn/perturbation.py`, `train.py`'s `--adv_*` defaults).

The term joins the task's loss in `Trainer.task_losses`, so whatever comes after sees
loss + term: PCGrad and the aggregators, the loss weightings, `trainer.accumulate`'s
micro-batches, autocast, fp16 loss scaling and the ranks' gradient averaging.
"""

from __future__ import annotations

import logging
import zlib

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mtbert.batching import Batch
from mtbert.device import autocast
from mtbert.losses import Objective
from mtbert.meters import LossMeter

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF


class Regularizer:
    """The `none` option, and the hooks the loop calls: `bind` once the model is on its
    device, `regularize` for each task's loss, `after_step` after each optimizer step."""

    def __init__(self, tasks: list[str], seed: int = 0):
        self.tasks = list(tasks)

    def bind(self, model: nn.Module, objectives: dict[str, Objective], device: torch.device, precision: str):
        pass

    def regularize(self, loss: Tensor, task: str, batch: Batch, output: Tensor, objective: Objective,
                   step: int) -> Tensor:
        return loss

    def after_step(self):
        pass

    def logged(self) -> dict[str, dict[str, float]]:
        """Each term's mean per task since the last call, for the `train` event."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class Smart(Regularizer):
    """SMART's smoothness-inducing adversarial term, and optionally its Bregman proximal term.

    Noise delta of standard deviation `noise_var` (the paper's sigma; MT-DNN scales a unit
    normal by it) is added to the word embeddings (a forward hook on the encoder's input
    embeddings: every family, and any module that shares them); `steps` times it moves by
    `step_size` along the gradient of D(f(x + delta), f(x)) in delta, normalised per token
    by its inf-norm (+ `epsilon`), as the paper's Algorithm 1 does, without its projection
    onto an epsilon-ball (`steps` x `step_size` bounds the move). (MT-DNN normalises delta +
    step_size * gradient as a whole, which sets every perturbation to unit inf-norm whatever
    the step size.) The term is `weight` x D(f(x + delta), f(x)), averaged over the batch,
    its gradient reaching the model through both outputs. D is the objective's
    `divergence`: symmetric KL for classification, squared error for regression.

    The noise is drawn from a hash of (run seed, step, task, example, sentence, token
    position, coordinate), not a generator: an example gets the same noise in one process
    or on any rank, whole or in micro-batches, before or after a resume, with no state to
    save and no host sync. The extra forwards draw their dropout from torch's generator,
    which resuming restores. Per task and step it costs `steps` + 1 forwards and as many
    backwards (the search's reach the noise only).

    `bregman` > 0 adds mu x D(f(x; theta), f(x; theta~)), the Bregman proximal term with
    the paper's momentum: theta~ is an EMA of the weights (`bregman_beta`, torch's
    AveragedModel), a "mean teacher" run in eval mode without gradients. It costs one more
    forward per task and step and a whole copy of the model's parameters in memory (MiniLM:
    91 MB, BERT-base: 440 MB in fp32), saved in last.pt.
    """

    def __init__(self, tasks: list[str], seed: int = 0, weight: float = 1.0, step_size: float = 1e-5,
                 noise_var: float = 1e-5, epsilon: float = 1e-6, steps: int = 1, bregman: float = 0.0,
                 bregman_beta: float = 0.99):
        super().__init__(tasks, seed)
        for key, value in (("weight", weight), ("step_size", step_size), ("noise_var", noise_var),
                           ("bregman", bregman)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (it keeps the normalisation from dividing by 0), got {epsilon}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be a whole number >= 0 (0: the random noise alone), got {steps!r}")
        if not 0 <= bregman_beta < 1:
            raise ValueError(f"bregman_beta must lie in [0, 1), got {bregman_beta}")
        self.seed, self.weight, self.step_size, self.noise_var = seed, weight, step_size, noise_var
        self.epsilon, self.steps, self.bregman, self.bregman_beta = epsilon, steps, bregman, bregman_beta
        self.teacher = None

    def bind(self, model, objectives, device, precision):
        for t in self.tasks:
            if type(objectives[t]).divergence is Objective.divergence:
                raise ValueError(f"smart compares the outputs of task {t}'s objective "
                                 f"({type(objectives[t]).__name__}), which has no divergence: give it a "
                                 "divergence(perturbed, clean) method, or use regularizer=none")
        self.model, self.device, self.precision = model, device, precision
        self.embeddings = model.encoder.get_input_embeddings()
        self.meters = {"smart": LossMeter(self.tasks, device)}
        extra = f"{self.steps} forward(s) and backward(s) to search the noise, 1 forward for the term"
        if self.bregman:
            self.teacher = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.bregman_beta))
            self.teacher.update_parameters(model)  # theta~_0 = theta_0: from here on, EMA
            self.teacher.eval()
            self.meters["bregman"] = LossMeter(self.tasks, device)
            size = sum(p.numel() * p.element_size() for p in self.teacher.parameters())
            extra += f", 1 forward of the EMA teacher ({size / 2**20:.0f} MiB of parameters)"
        log.info("regularizer smart (weight %g, step_size %g, noise_var %g, steps %d, bregman %g): per task and "
                 "step, %s", self.weight, self.step_size, self.noise_var, self.steps, self.bregman, extra)

    def regularize(self, loss, task, batch, output, objective, step):
        smart = self.weight * self.smoothness(task, batch, output, objective, step)
        self.meters["smart"].add({task: smart.detach()})
        if self.teacher is None:
            return loss + smart
        with torch.no_grad(), autocast(self.device, self.precision):
            target = self.teacher(task, batch)
        bregman = self.bregman * objective.divergence(output, target).mean()
        self.meters["bregman"].add({task: bregman.detach()})
        return loss + smart + bregman

    def smoothness(self, task: str, batch: Batch, output: Tensor, objective: Objective, step: int) -> Tensor:
        """D(f(x + delta), f(x)) at the noise the ascent found, averaged over the batch."""
        noise = self.noise_var * self.noise(task, batch, step)
        clean = output.detach()  # the search's graph is its own: the loss's stays whole
        for _ in range(self.steps):
            noise.requires_grad_()
            with torch.enable_grad():  # also where the caller recomputes losses without (FAMO)
                divergence = objective.divergence(self.perturbed(task, batch, noise), clean).sum()
                grad, = torch.autograd.grad(divergence, noise, allow_unused=True)
            noise = noise.detach()
            if grad is not None:  # None while the schedule freezes the encoder: the noise stays as drawn
                noise = noise + self.step_size * grad / (grad.abs().amax(-1, keepdim=True) + self.epsilon)
        return objective.divergence(self.perturbed(task, batch, noise), output).mean()

    def perturbed(self, task: str, batch: Batch, noise: Tensor) -> Tensor:
        """The model's output on `batch` with `noise` (fp32) added to its word embeddings."""
        handle = self.embeddings.register_forward_hook(lambda module, args, embedded: embedded + noise)
        try:
            with autocast(self.device, self.precision):
                return self.model(task, batch)
        finally:
            handle.remove()

    def noise(self, task: str, batch: Batch, step: int) -> Tensor:
        """Standard normal [sequences, length, embedding dim] in fp32, each coordinate a hash
        of (run seed, step, task, example, sentence, position, coordinate) through Box-Muller."""
        rows, length = batch.input_ids.shape
        examples = len(batch.index)
        device = batch.input_ids.device
        sentence = torch.arange(rows, device=device) // examples  # siamese pairs: first sentences, then second
        base = zlib.crc32(f"{self.seed}/{step}/{task}".encode())
        key = mix((batch.index.repeat(rows // examples) * 2 + sentence + base) & M32)
        coordinate = torch.arange(length * self.embeddings.embedding_dim, device=device)
        coordinate = coordinate.view(length, -1)
        counter = key[:, None, None] ^ (2 * coordinate)

        def uniform(bits):  # (0, 1) from the top 24 bits
            return ((mix(bits) >> 8).float() + 0.5) / 2**24

        return (-2 * uniform(counter).log()).sqrt() * torch.cos(2 * torch.pi * uniform(counter ^ 1))

    def after_step(self):
        if self.teacher is not None:
            self.teacher.update_parameters(self.model)

    def logged(self):
        return {name: meter.read() for name, meter in self.meters.items()}

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state):
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])


def mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (three multiply-xorshift rounds) of int64 values in [0, 2^32),
    exact in int64: the multipliers are below 2^31, so no product overflows."""
    for multiplier in (0x7FEB352D, 0x6B43A9B5, 0x2C1B3C6D):
        x = ((x ^ (x >> 16)) * multiplier) & M32
    return x ^ (x >> 16)
