"""CoOp's context injection (clipsvd.adapters.prompt): exact before training on every text
tower clipsvd loads, untouched for other text, and saved and loaded exactly."""
from __future__ import annotations

import pytest
import torch

from clipsvd.adapters import attach, freeze
from clipsvd.errors import ModelError
from clipsvd.models import encode_class_prompts, load_model

TOWERS = [("tiny-clip", None), ("tiny-biomedclip", None), ("mini-clip", "medmnist")]
CLASSES = ["neutrophil", "left lung", "moderate diabetic retinopathy"]


@pytest.mark.parametrize("name,pretrained", TOWERS)
def test_context_from_a_photo_of_a_gives_the_tokenised_prompts_features(name, pretrained):
    """OpenAI-style open_clip tower, BiomedCLIP's HF BERT tower, mini-clip's tower. The plain
    model is frozen too: a model without trainable weights takes torch's attention fast path,
    whose float32 results differ by ~2e-7 from the other's; frozen, they are bit-identical."""
    plain = load_model(name, pretrained, 0)
    freeze(plain.model)
    adapted = load_model(name, pretrained, 0)
    adapter = attach("coop", adapted.model, {"n_ctx": 4, "ctx_init": "a photo of a"},
                     tokenizer=adapted.tokenizer)
    assert adapter.prompt_templates(["a blood smear showing {}."]) == ("a photo of a {}.",)
    with torch.no_grad():
        want = encode_class_prompts(plain, CLASSES, ["a photo of a {}."])
        got = encode_class_prompts(adapted, CLASSES, adapter.prompt_templates([]))
    assert torch.equal(got, want), (got - want).abs().max()
    with torch.no_grad():  # moved context changes the prompts' features, and only theirs
        ctx = adapter.named_trainable()["ctx"]  # (a constant shift would vanish in LayerNorm)
        ctx.add_(0.5 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0)))
        moved = encode_class_prompts(adapted, CLASSES, ["a photo of a {}."])
        other = encode_class_prompts(adapted, CLASSES, ["an image of {}."])
        assert torch.equal(other, encode_class_prompts(plain, CLASSES, ["an image of {}."]))
    assert (moved - want).abs().max() > 1e-3


@pytest.mark.parametrize("name,pretrained", TOWERS[:2])
def test_gradients_reach_only_the_context(name, pretrained):
    loaded = load_model(name, pretrained, 0)
    adapter = attach("coop", loaded.model, {}, tokenizer=loaded.tokenizer)
    text = encode_class_prompts(loaded, CLASSES, adapter.prompt_templates([]))
    text.sum().backward()
    ctx = adapter.named_trainable()["ctx"]
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0 and ctx.dtype == torch.float32
    assert [n for n, p in loaded.model.named_parameters() if p.requires_grad] == [
        f"{adapter.embedding_path}.clipsvd_context"]


def test_save_and_load_are_exact_and_a_wrong_context_length_is_refused(tmp_path):
    loaded = load_model("tiny-clip", None, 0)
    adapter = attach("coop", loaded.model, {}, tokenizer=loaded.tokenizer)
    with torch.no_grad():
        adapter.named_trainable()["ctx"].normal_()
    adapter.save(tmp_path / "coop.safetensors")
    fresh = load_model("tiny-clip", None, 0)
    again = attach("coop", fresh.model, {}, tokenizer=fresh.tokenizer)
    again.load(tmp_path / "coop.safetensors")
    assert torch.equal(again.named_trainable()["ctx"], adapter.named_trainable()["ctx"])
    with pytest.raises(ModelError, match="CoOp n_ctx is 3 but ctx_init .a photo of a. is 4 tokens"):
        attach("coop", load_model("tiny-clip", None, 0).model, {"n_ctx": 3},
               tokenizer=loaded.tokenizer)


def test_the_published_recipe_is_the_default_sgd_with_a_warm_up_epoch():
    from clipsvd import config
    from clipsvd.train import cosine_lr, make_optimizer, schedule

    cfg = config.from_dict({"study": "s", "datasets": [{"name": "d", "format": "folder",
                                                        "root": "x"}]}).coop
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size, cfg.n_ctx, cfg.ctx_init) == (
        0.002, 5e-4, 100, 32, 4, "a photo of a")
    rates = schedule(cfg, steps=10, steps_per_epoch=3)
    assert rates[:3] == [1e-5] * 3
    assert rates[3:] == [cosine_lr(s, 7, 0.002, cfg.min_lr) for s in range(7)]
    optimizer = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4
    with pytest.raises(config.ConfigError, match="key 'coop.n_ctx': 3 context vectors, but "
                                                 "ctx_init 'a photo of a' has 4 words"):
        config.from_dict({"study": "s", "datasets": [{"name": "d", "format": "folder",
                                                      "root": "x"}], "coop": {"n_ctx": 3}})


def test_kgcoop_term_is_its_distance_to_the_frozen_models_hand_written_prompts():
    from clipsvd.adapters.prompt import knowledge_distance

    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    assert float(knowledge_distance(a, b)) == pytest.approx(1 - (0.0 + 1.0) / 2)
    plain = load_model("tiny-clip", None, 0)
    freeze(plain.model)
    loaded = load_model("tiny-clip", None, 0)
    adapter = attach("kgcoop", loaded.model, {"w": 3.0}, tokenizer=loaded.tokenizer)
    text = encode_class_prompts(loaded, CLASSES, adapter.prompt_templates([]))
    assert float(adapter.extra_loss(loaded, CLASSES, text.detach())) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ctx = adapter.named_trainable()["ctx"]
        ctx.add_(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)))
    text = encode_class_prompts(loaded, CLASSES, adapter.prompt_templates([]))
    with torch.no_grad():
        frozen = encode_class_prompts(plain, CLASSES, ["a photo of a {}."])
    direct = 3.0 * (1 - torch.nn.functional.cosine_similarity(text, frozen, dim=1).mean())
    term = adapter.extra_loss(loaded, CLASSES, text)
    value = float(term.detach())
    assert value == pytest.approx(float(direct.detach()), rel=1e-5) and value > 1e-3
    term.backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
