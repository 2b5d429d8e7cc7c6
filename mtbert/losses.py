"""Task objectives (paper eq. 1-3): what a task's head outputs, its loss, its prediction.

An objective decides the head it needs (`head`: a linear layer with `outputs(task)`
units, or the cosine of two sentence embeddings) so that choosing `loss=cosine` is all it
takes to train STS through cosine similarity. The task weights lambda of eq. 1 are
applied by the trainer (`loss.weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtbert.data import Task


class Objective:
    # True: the head is the cosine of the two sentences' embeddings (section 3.7), not a
    # linear layer, so the pairs are encoded siamese (`mtbert.build.pair_encodings`)
    compares_embeddings = False

    def check(self, task: Task):
        """Raise ValueError if this objective cannot train `task`."""

    def outputs(self, task: Task) -> int:
        return 1

    def loss(self, output: Tensor, labels: Tensor, task: Task) -> Tensor:
        raise NotImplementedError

    def predict(self, output: Tensor, task: Task) -> Tensor:
        """Class ids for classification, a score on the task's scale for regression."""
        raise NotImplementedError

    def probabilities(self, output: Tensor, task: Task) -> Tensor:
        """[B, classes] class probabilities of a classification objective (error analysis)."""
        raise NotImplementedError(f"{type(self).__name__} gives no class probabilities")

    def divergence(self, perturbed: Tensor, clean: Tensor) -> Tensor:
        """[B] how far each example's output moved: what SMART (mtbert.regularizer) penalises."""
        raise NotImplementedError(f"{type(self).__name__} gives no divergence")


class CrossEntropy(Objective):
    """Eq. 2: weighted cross-entropy over the task's classes (weighted mean over the batch)."""

    def __init__(self, class_weights: list[float] | None = None):
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None

    def check(self, task):
        if task.classes is None:
            raise ValueError(f"CrossEntropy needs a classification task; {task.name} is a regression")
        if self.class_weights is not None and len(self.class_weights) != task.classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} "
                             f"values; task {task.name} has {task.classes} classes")

    def outputs(self, task):
        return task.classes

    def loss(self, output, labels, task):
        weight = self.class_weights.to(output.device) if self.class_weights is not None else None
        return F.cross_entropy(output.float(), labels.long(), weight=weight)

    def predict(self, output, task):
        return output.argmax(-1)

    def probabilities(self, output, task):
        return output.float().softmax(-1)

    def divergence(self, perturbed, clean):
        """Symmetric KL of the two softmax distributions: sum_c (p_c - q_c)(log p_c - log q_c)."""
        log_p, log_q = perturbed.float().log_softmax(-1), clean.float().log_softmax(-1)
        return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


class BinaryCrossEntropy(Objective):
    """One logit and BCE with logits, for two-class tasks (the paper's paraphrase loss)."""

    def check(self, task):
        if task.classes != 2:
            raise ValueError(f"BinaryCrossEntropy needs a two-class task; {task.name} is not")

    def loss(self, output, labels, task):
        return F.binary_cross_entropy_with_logits(output.float(), labels)

    def predict(self, output, task):
        return (output > 0).long()

    def probabilities(self, output, task):
        positive = output.float().sigmoid()
        return torch.stack([1 - positive, positive], -1)

    def divergence(self, perturbed, clean):
        """Symmetric KL of the two Bernoulli distributions, which is (p - q)(logit p - logit q)."""
        a, b = perturbed.float(), clean.float()
        return (a.sigmoid() - b.sigmoid()) * (a - b)


class MeanSquaredError(Objective):
    """A regression head trained with MSE on the task's own scale."""

    def check(self, task):
        if task.score_range is None:
            raise ValueError(f"MeanSquaredError needs a regression task; {task.name} is not")

    def loss(self, output, labels, task):
        return F.mse_loss(output.float(), labels)

    def predict(self, output, task):
        return output.float()

    def divergence(self, perturbed, clean):
        return squared_error(perturbed, clean)


class _Cosine(Objective):
    """Shared by the cosine objectives: the head outputs cos(u, v) of the two sentences,
    and the score is cos mapped linearly onto the task's scale (Pearson is unchanged)."""

    compares_embeddings = True

    def check(self, task):
        if task.score_range is None or not task.is_pair:
            raise ValueError(f"{type(self).__name__} needs a sentence-pair regression task; "
                             f"{task.name} is not")

    def predict(self, output, task):
        low, high = task.score_range
        return low + output.float() * (high - low)

    def divergence(self, perturbed, clean):
        return squared_error(perturbed, clean)


class CosineEmbedding(_Cosine):
    """Eq. 3: pairs with a label >= `threshold` are similar (y=1, loss 1 - cos), others
    dissimilar (y=-1, loss max(0, cos - margin))."""

    def __init__(self, margin: float = 0.0, threshold: float = 2.5):
        if not -1.0 <= margin <= 1.0:
            raise ValueError(f"loss margin must lie in [-1, 1], got {margin}")
        self.margin, self.threshold = margin, threshold

    def loss(self, output, labels, task):
        cos = output.float()
        similar = labels >= self.threshold
        return torch.where(similar, 1 - cos, (cos - self.margin).clamp(min=0)).mean()


class CosineMSE(_Cosine):
    """MSE between cos(u, v) and the label rescaled to [0, 1] (Sentence-BERT's
    CosineSimilarityLoss): keeps the grading that eq. 3's threshold throws away."""

    def loss(self, output, labels, task):
        low, high = task.score_range
        return F.mse_loss(output.float(), (labels - low) / (high - low))


def squared_error(perturbed: Tensor, clean: Tensor) -> Tensor:
    """A regression output's divergence: its squared change, in fp32."""
    return (perturbed.float() - clean.float()) ** 2


def default_objective(task: Task) -> Objective:
    """The baseline for a task that the loss config does not name: BCE for two classes,
    cross-entropy for more, MSE for regression."""
    if task.classes is None:
        return MeanSquaredError()
    return BinaryCrossEntropy() if task.classes == 2 else CrossEntropy()
