"""The loss paths compute the model's own loss and gradients: chunked cross-entropy (a GPU memory saver) and
Liger's fused linear cross-entropy (wiring checked with a stand-in; Liger itself needs CUDA)."""

import torch

from pipeline_config import load_config
from tasks.lib import chat, datarows, modeling, packing, trainer


def test_chunked_loss_matches_model_loss_and_gradients(tiny_config, assets):
    cfg = load_config(tiny_config)
    model = trainer.build_model(cfg, "cpu")
    tokenizer = modeling.load_tokenizer(cfg.model.base)
    rows = datarows.read_jsonl(assets["data"] / "train.jsonl")[:12]
    examples, _ = chat.tokenize_rows(tokenizer, rows, 128)
    pack = packing.pack_examples(examples, 256, seed=0)[0]
    batch = trainer.as_batch(pack, "cpu")
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(chunk_tokens: int):
        model.zero_grad()
        loss = trainer.training_loss(model, batch, chunk_tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora]

    reference, reference_grads = loss_and_grads(0)
    chunked, chunked_grads = loss_and_grads(37)  # not a divisor of the length: a ragged last chunk
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(chunked_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in reference_grads)


def test_liger_kernels_are_wired_to_the_same_loss(tiny_config, assets, monkeypatch):
    """Liger needs CUDA, so here a stand-in module with its API (and plain-torch math) checks the wiring:
    which kernels build_model asks for, and that the fused linear cross-entropy gets the hidden states,
    targets and lm_head that give the model's own loss."""
    import sys
    import types

    class FusedLinearCrossEntropy:  # liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss, in torch
        def __init__(self, ignore_index, reduction):
            self.ignore_index, self.reduction = ignore_index, reduction

        def __call__(self, weight, hidden, targets, bias=None):
            logits = torch.nn.functional.linear(hidden, weight, bias).float()
            return torch.nn.functional.cross_entropy(logits, targets, ignore_index=self.ignore_index,
                                                     reduction=self.reduction)

    applied = []
    stub = types.ModuleType("liger_kernel.transformers")
    stub.LigerFusedLinearCrossEntropyLoss = FusedLinearCrossEntropy
    stub._apply_liger_kernel_to_instance = lambda model, **kernels: applied.append((model, kernels))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", stub)

    cfg = load_config(tiny_config, ["train.kernels=liger"])
    model = trainer.build_model(cfg, "cpu")
    assert len(applied) == 1 and applied[0][0] is model.get_base_model()
    assert applied[0][1] == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                             "fused_linear_cross_entropy": False}
    tokenizer = modeling.load_tokenizer(cfg.model.base)
    examples, _ = chat.tokenize_rows(tokenizer, datarows.read_jsonl(assets["data"] / "train.jsonl")[:12], 128)
    batch = trainer.as_batch(packing.pack_examples(examples, 256, seed=0)[0], "cpu")
    torch.testing.assert_close(trainer.training_loss(model, batch, 0, kernels="liger"),
                               trainer.training_loss(model, batch, 0), rtol=1e-5, atol=1e-6)
