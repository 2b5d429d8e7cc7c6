"""How much the tasks share below their heads (the `sharing` group).

The paper shares the whole encoder and one layer above it (hard sharing), and asks in
section 5.2 whether keeping the layers below the heads "as shared as possible" is right.
Each option here gives the tasks something of their own, and says so once for the rest
of mtbert: a task's own parameters (`own`) get that task's gradient alone, as its head
does, and only the parameters more than one task reaches go to PCGrad, the aggregators,
GradNorm and the averaging of shared gradients.

- `HardSharing`: today's model, one encoder and one shared layer for every task.
- `TopLayers`: the last `k` encoder layers copied per task, each copy starting from the
  pretrained layer (the practice of the strongest CS224N multitask projects). The
  registered encoder keeps the shared bottom layers only, and each task runs a view of it
  whose layer list is the shared layers then its own copies: no parameter is held twice,
  and none is left that nothing uses.
- `LoraAdapters`: one low-rank adapter per task on the encoder's linear layers (Hu et al.
  2021, through PEFT), the task's adapter active in its forward; the base encoder trained
  or frozen.
- `MixtureOfExperts`: MMoE (Ma et al. 2018): `experts` layers of the shared layer's form
  over the pooled embedding, mixed by a softmax gate for each task whose head reads them.

An option is built from its config before the model exists, then `attach`es to the model
(`mtbert.build.build_network`): it may add modules, replace the shared layer, inject
adapters, and becomes `model.sharing`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import Tensor, nn


class SharedLayer(nn.Sequential):
    """Linear + ReLU + dropout over the pooled embedding (section 3.1); called with the
    task, which hard sharing does not need."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, pooled: Tensor, task: str | None = None) -> Tensor:
        return super().forward(pooled)


class HardSharing(nn.Module):
    """Every task shares the encoder and the shared layer; each owns its head only.

    The hooks an option overrides: `attach` (change the model), `encoder` (what runs for a
    task), `own` (a task's parameters below its head), `groups` (their optimizer groups),
    `set_trainable` (what the schedule's frozen phases freeze, `frozen` says it in words)
    and `compile`.
    """

    frozen = "encoder frozen"

    def attach(self, model: nn.Module):
        model.sharing = self

    def encoder(self, model: nn.Module, task: str | None) -> nn.Module:
        return model.encoder

    def own(self, model: nn.Module, task: str) -> list[nn.Parameter]:
        return []

    def groups(self, model: nn.Module, lr) -> list[tuple[str, list[nn.Parameter], float]]:
        """(name, parameters, learning rate) of each task's own parameters below its head."""
        return []

    def set_trainable(self, model: nn.Module, trainable: bool) -> bool:
        """Train or freeze what the schedule's phases switch; whether the encoder's forward
        needs autograd."""
        model.encoder.requires_grad_(trainable)
        return trainable

    def compile(self, model: nn.Module):
        model.encoder.compile(dynamic=True)


def layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's list of its `num_hidden_layers` layers and its path (`encoder.layer`
    in BERT, RoBERTa and DeBERTa, `transformer.layer` in DistilBERT)."""
    n = encoder.config.num_hidden_layers
    found = [(name, m) for name, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"found {len(found)} lists of {n} layers in this {encoder.config.model_type} encoder "
                         f"({[name for name, _ in found]}), not one: this family needs sharing=hard or lora")
    return found[0]


def encoder_view(encoder: nn.Module, path: str, layers: list[nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """The encoder as it would be with `layers` at `path`, sharing everything else: shallow
    copies of the modules along the path, each with its own `_modules` (a shallow copy of a
    module shares that dict), and a new list. Its family's own forward runs it. Returns the
    view and the modules it owns (whose `training` flag follows the model's)."""
    root = node = copy.copy(encoder)
    owned = [root]
    *parents, leaf = path.split(".")
    vars(root)["_modules"] = dict(root._modules)
    for name in parents:
        child = copy.copy(node._modules[name])
        vars(child)["_modules"] = dict(child._modules)
        node._modules[name] = child
        owned.append(child)
        node = child
    node._modules[leaf] = nn.ModuleList(layers)
    owned.append(node._modules[leaf])
    return root, owned


class TopLayers(HardSharing):
    """The last `k` encoder layers copied per task, each copy from the pretrained layer.

    The copies are `layers[task]`; the registered encoder keeps the `n - k` shared layers
    (the pretrained top layers live on in the copies only), and `views[task]`, held out of
    the state_dict, runs the shared layers then the task's. Each copy trains at the encoder's
    rate, or `lr`; a frozen phase freezes the encoder and the copies.
    """

    frozen = "encoder and the tasks' top layers frozen"

    def __init__(self, k: int = 1, lr: float | None = None):
        super().__init__()
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 or null (the encoder's rate), got {lr}")
        self.k, self.lr = k, lr

    def attach(self, model):
        path, shared = layer_list(model.encoder)
        n = len(shared)
        if self.k >= n:
            raise ValueError(f"k={self.k} must be smaller than the encoder's {n} layers, so that at least one "
                             f"stays shared: set sharing.k to at most {n - 1}")
        top = list(shared[n - self.k:])
        self.layers = nn.ModuleDict({t: nn.ModuleList(copy.deepcopy(layer) for layer in top) for t in model.heads})
        del shared[n - self.k:]
        views = {t: encoder_view(model.encoder, path, [*shared, *self.layers[t]]) for t in model.heads}
        self.views = {t: view for t, (view, _) in views.items()}  # a dict: not registered
        self.view_modules = [m for _, owned in views.values() for m in owned]
        super().attach(model)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.view_modules:
            m.training = mode
        return self

    def encoder(self, model, task):
        if task is None:
            raise ValueError("sharing=top_layers: each task has its own top layers; name the task")
        return self.views[task]

    def own(self, model, task):
        return list(self.layers[task].parameters())

    def groups(self, model, lr):
        return [(f"layers_{t}", self.own(model, t), self.lr or lr.encoder) for t in self.layers]

    def set_trainable(self, model, trainable):
        self.layers.requires_grad_(trainable)
        return super().set_trainable(model, trainable)

    def compile(self, model):
        for view in self.views.values():
            view.compile(dynamic=True)


# LoRA's targets by role, per family: the linear layers inside each encoder layer
LORA_TARGETS = {
    "bert": {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attention_output": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    "distilbert": {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
                   "attention_output": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
    "deberta-v2": {"query": "attention.self.query_proj", "key": "attention.self.key_proj",
                   "value": "attention.self.value_proj", "attention_output": "attention.output.dense",
                   "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
}
LORA_TARGETS["roberta"] = LORA_TARGETS["bert"]


def lora_modules(encoder: nn.Module, targets: list[str]) -> list[str]:
    """The full names of the linear layers `targets` name in each encoder layer: roles
    (`query`, `key`, `value`, `attention_output`, `ffn_in`, `ffn_out`) for the families of
    LORA_TARGETS, or a module's name inside a layer (`attention.self.query`) for any."""
    family = encoder.config.model_type
    roles = LORA_TARGETS.get(family, {})
    path, layers = layer_list(encoder)
    names = []
    for target in targets:
        inner = roles.get(target, target)
        found = [f"{path}.{i}.{name}" for i, layer in enumerate(layers) for name, m in layer.named_modules()
                 if name == inner and isinstance(m, nn.Linear)]
        if not found:
            known = f"roles {sorted(roles)}, or " if roles else ""
            linear = sorted({name for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"targets: {target!r} names no linear layer in this {family} encoder's layers; "
                             f"name {known}a linear layer inside a layer: {linear}")
        names += found
    return names


class LoraAdapters(HardSharing):
    """One LoRA adapter per task (rank `r`, scale `alpha / r`, `dropout` on its input) on
    the `targets` of every encoder layer, injected into the encoder in place by PEFT;
    B starts at zero, so each task starts from the pretrained encoder.

    A task's forward runs with its adapter active. PEFT's `set_adapter` also makes the
    active adapter trainable and the others not, and autograd leaves the gradient of a
    leaf whose `requires_grad` changed after its forward, which would drop every task's
    adapter gradient but the last in a step of per-task backwards (PCGrad): so each
    adapter's `requires_grad` is set back at once, as the schedule's phase has it. The base
    encoder trains at the encoder's rate with `train_base`, else stays frozen (the shared
    layer is then all that the tasks share); adapters at the encoder's rate, or `lr`. A
    frozen phase freezes the base and every adapter.
    """

    frozen = "encoder frozen (its base and every adapter)"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1,
                 targets: list[str] = ("query", "key", "value"), train_base: bool = False, lr: float | None = None):
        super().__init__()
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r must be a whole number >= 1, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not targets:
            raise ValueError("targets is empty: name the layers that get adapters, e.g. [query, key, value]")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0 or null (the encoder's rate), got {lr}")
        self.r, self.alpha, self.dropout, self.targets = r, alpha, dropout, list(targets)
        self.train_base, self.lr = train_base, lr
        self.active, self.adapters_on = None, True

    def attach(self, model):
        from peft import LoraConfig, inject_adapter_in_model  # PEFT only where LoRA is chosen
        from peft.tuners.tuners_utils import BaseTunerLayer

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=lora_modules(model.encoder, self.targets))
        with warnings.catch_warnings():  # each task's adapter after the first: meant
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
            for t in model.heads:
                inject_adapter_in_model(config, model.encoder, adapter_name=t)
        self.layers = [m for m in model.encoder.modules() if isinstance(m, BaseTunerLayer)]  # a list: not registered
        self.all_adapters = [p for t in model.heads for p in self.adapters(t)]
        if model.checkpoint_above is not None:
            # model.gradient_checkpointing: recompute each layer with the adapter of its forward
            model.checkpoint_encoder(context_fn=self.recompute_context)
        super().attach(model)
        model.set_encoder_trainable(True)

    def adapters(self, task: str) -> list[nn.Parameter]:
        return [p for layer in self.layers for name in layer.adapter_layer_names
                if task in getattr(layer, name) for p in getattr(layer, name)[task].parameters()]

    def activate(self, task: str):
        if task == self.active:
            return
        for layer in self.layers:
            layer.set_adapter(task)
        for p in self.all_adapters:
            p.requires_grad_(self.adapters_on)
        self.active = task

    @contextlib.contextmanager
    def activated(self, task: str):
        before = self.active
        self.activate(task)
        try:
            yield
        finally:
            self.activate(before)

    def recompute_context(self):
        """Gradient checkpointing recomputes a layer in the backward, after later tasks'
        forwards switched the adapter: recompute with the forward's."""
        return contextlib.nullcontext(), self.activated(self.active)

    def encoder(self, model, task):
        if task is None:
            raise ValueError("sharing=lora: each task has its own adapter; name the task")
        self.activate(task)
        return model.encoder

    def own(self, model, task):
        return self.adapters(task)

    def groups(self, model, lr):
        return [(f"lora_{t}", self.own(model, t), self.lr or lr.encoder) for t in model.heads]

    def set_trainable(self, model, trainable):
        adapters = {id(p) for p in self.all_adapters}
        for p in model.encoder.parameters():
            p.requires_grad_(trainable and (self.train_base or id(p) in adapters))
        self.adapters_on = trainable
        return trainable

    def compile(self, model):
        raise ValueError("compile=true with sharing=lora: the compiled encoder does not follow PEFT's switch to "
                         "each task's adapter (tried: the other tasks' outputs came out wrong); set "
                         "trainer.compile=false, or choose sharing=hard, top_layers or mmoe")


class Experts(nn.Module):
    """MMoE's layer over the pooled embedding: sum_i softmax(gate_t(pooled))_i expert_i(pooled),
    for the tasks with a gate; None for the others, whose heads do not read it."""

    def __init__(self, experts: list[nn.Module], gates: dict[str, nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gates = nn.ModuleDict(gates)

    def forward(self, pooled: Tensor, task: str) -> Tensor | None:
        if task not in self.gates:
            return None
        weights = self.gates[task](pooled).softmax(-1)  # [B, n]
        outputs = torch.stack([expert(pooled) for expert in self.experts], dim=-2)  # [B, n, hidden]
        return (weights.unsqueeze(-1) * outputs).sum(-2)


def fresh(module: nn.Module) -> nn.Module:
    """A copy of `module` with newly drawn parameters."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class MixtureOfExperts(HardSharing):
    """MMoE (Ma et al. 2018): `experts` layers of the shared layer's form (each newly
    initialised) in its place, and a softmax gate per task (a linear map of the pooled
    embedding to one logit per expert). The experts are shared; a task's gate is its own,
    and trains at the shared layer's rate. A task whose head reads the pooled embedding
    instead (the cosine head, as with hard sharing) has no gate. A frozen phase freezes the encoder; experts and gates train on, as
    the shared layer does."""

    frozen = "encoder frozen (the experts and gates train on, as the shared layer does)"

    def __init__(self, experts: int = 4):
        super().__init__()
        if not (isinstance(experts, int) and experts >= 2):
            raise ValueError(f"experts must be a whole number >= 2 (one expert is hard sharing), got {experts!r}")
        self.n = experts

    def attach(self, model):
        hidden = model.encoder.config.hidden_size
        model.shared = Experts([fresh(model.shared) for _ in range(self.n)],
                               {t: nn.Linear(hidden, self.n) for t, head in model.heads.items() if head.reads_shared})
        super().attach(model)

    def own(self, model, task):
        return list(model.shared.gates[task].parameters()) if task in model.shared.gates else []

    def groups(self, model, lr):
        return [(f"gate_{t}", self.own(model, t), lr.shared) for t in model.shared.gates]
