"""The chunked cross-entropy (a GPU memory saver) computes the model's own loss and gradients."""

import torch

from pipeline_config import load_config
from tasks import dataset, modeling, train


def test_chunked_loss_matches_model_loss_and_gradients(tiny_config, assets):
    cfg = load_config(tiny_config)
    model = train.build_model(cfg, "cpu")
    tokenizer = modeling.load_tokenizer(cfg.model.base)
    rows = dataset.read_jsonl(assets["data"] / "train.jsonl")[:12]
    examples, _ = dataset.tokenize_rows(tokenizer, rows, 128)
    pack = dataset.pack_examples(examples, 256, seed=0)[0]
    batch = train.as_batch(pack, "cpu")
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(chunk_tokens: int):
        model.zero_grad()
        loss = train.training_loss(model, batch, chunk_tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora]

    reference, reference_grads = loss_and_grads(0)
    chunked, chunked_grads = loss_and_grads(37)  # not a divisor of the length: a ragged last chunk
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(chunked_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in reference_grads)

