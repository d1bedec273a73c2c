"""The prompt learners (clipsvd.adapters.prompt): CoOp's context injection exact before training on
every text tower clipsvd loads, untouched for other text, saved and loaded exactly; KgCoOp's and
BiomedCoOp's extra terms against direct computations."""
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


def test_biomedcoop_pruning_keeps_the_descriptions_within_tau_standard_deviations():
    """The public rule (z from median and MAD, standardised again, |.| <= tau) computed
    directly, against kept_descriptions; equal scores (MAD 0, where the public code divides
    by zero) keep every description."""
    from clipsvd.adapters.prompt import kept_descriptions

    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 3.0, 0.95, -1.2])
    median = scores.median()
    z = (scores - median) / (scores - median).abs().median()
    public = ((z - z.mean()) / z.std()).abs() <= 1.5
    assert public.tolist() == [True, True, True, True, False, True, False]
    assert kept_descriptions(scores, 1.5).tolist() == public.tolist()
    assert kept_descriptions(torch.ones(5), 1.5).all()
    assert kept_descriptions(torch.tensor([2.0]), 1.5).all()


def test_biomedcoop_terms_match_a_direct_computation():
    """SCCM and KDSP on fixed tensors, written out step by step as the published trainer does
    them (a loop over descriptions, the kept ones' mean, MSE and a summed KL / numel)."""
    from clipsvd.adapters.prompt import biomedcoop_terms, kept_descriptions

    g = torch.Generator().manual_seed(0)
    n_classes, n_desc, dim, batch = 3, 6, 8, 5
    desc = torch.nn.functional.normalize(torch.randn(n_classes, n_desc, dim, generator=g), dim=-1)
    desc[:, 4] = torch.nn.functional.normalize(desc[:, 4] * 0.01 + 1.0, dim=-1)  # an outlier
    text = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * image @ text.t()
    scores = torch.stack([(scale * image @ desc[:, i].t()).max(dim=1).values.mean()
                          for i in range(n_desc)])
    kept = kept_descriptions(scores, 1.5)
    assert 0 < int(kept.sum()) < n_desc  # the case where pruning matters
    teacher = torch.nn.functional.normalize(desc[:, kept].mean(dim=1), dim=-1)
    zero_shot = scale * image @ teacher.t()
    target = torch.nn.functional.normalize(desc.mean(dim=1), dim=-1)
    sccm = ((text - target) ** 2).mean()
    p = torch.softmax(zero_shot, dim=1)
    kdsp = (p * (torch.log_softmax(zero_shot, 1) - torch.log_softmax(logits, 1))).sum() / logits.numel()
    got = biomedcoop_terms(text, image, logits, desc, scale, 1.5)
    assert float(got[0]) == pytest.approx(float(sccm), rel=1e-6)
    assert float(got[1]) == pytest.approx(float(kdsp), rel=1e-5) and float(kdsp) > 1e-4


def test_biomedcoop_loss_uses_the_frozen_models_description_features(tmp_path):
    """The adapter's extra loss equals the terms computed with the plain model's features for
    the descriptions (the context, though initialised from 'a photo of a', is not injected
    into a description that starts with those words), weighted by the lambdas."""
    from clipsvd.adapters.prompt import biomedcoop_terms

    descriptions = [[f"a photo of a {c}.", f"an image of {c}."] for c in CLASSES]
    plain = load_model("tiny-clip", None, 0)
    freeze(plain.model)
    loaded = load_model("tiny-clip", None, 0)
    adapter = attach("biomedcoop", loaded.model, {"sccm_lambda": 2.0, "kdsp_lambda": 0.5},
                     tokenizer=loaded.tokenizer)
    adapter.descriptions = descriptions
    with torch.no_grad():
        ctx = adapter.named_trainable()["ctx"]
        ctx.add_(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)))
        flat = [s for d in descriptions for s in d]
        frozen = torch.nn.functional.normalize(
            plain.model.encode_text(plain.tokenizer(flat)), dim=-1).reshape(3, 2, -1)
    text = encode_class_prompts(loaded, CLASSES, adapter.prompt_templates([]))
    image = torch.nn.functional.normalize(torch.randn(4, text.shape[1]), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.t()
    sccm, kdsp = biomedcoop_terms(text.detach(), image, logits.detach(), frozen, scale, 1.5)
    term = adapter.extra_loss(loaded, CLASSES, text, image, logits, scale)
    assert float(term.detach()) == pytest.approx(float(2.0 * sccm + 0.5 * kdsp), rel=1e-5)
    term.backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_description_files_are_checked_in_one_line(tmp_path):
    from clipsvd.descriptions import class_descriptions
    from clipsvd.errors import ConfigError

    path = tmp_path / "desc.yaml"
    path.write_text("cyst: [a round dark lesion.]\ntumor: [a solid mass.]\n")
    assert class_descriptions(path, ["tumor", "cyst"]) == [["a solid mass."],
                                                            ["a round dark lesion."]]
    with pytest.raises(ConfigError, match=r"desc.yaml: no descriptions for class 'calcification'; add"):
        class_descriptions(path, ["cyst", "tumor", "calcification"])
    path.write_text("cyst: []\ntumor: [a solid mass.]\n")
    with pytest.raises(ConfigError, match="class 'cyst' needs a non-empty list"):
        class_descriptions(path, ["cyst", "tumor"])
    path.write_text("cyst: [a, b]\ntumor: [c]\n")
    with pytest.raises(ConfigError, match="'tumor' has 1 sentences and 'cyst' 2"):
        class_descriptions(path, ["cyst", "tumor"])
    with pytest.raises(ConfigError, match="description file not found"):
        class_descriptions(tmp_path / "none.yaml", ["cyst"])


@pytest.mark.parametrize("name,pretrained", TOWERS)
def test_cocoop_with_a_zero_shift_scores_each_image_as_the_tokenised_prompts(name, pretrained):
    """Every image its own prompts, in one text batch: with the meta-network's output zeroed
    the per-row injection must give each image the plain model's logits for "a photo of a
    {class}." (to float tolerance), on every tower; a nonzero shift must change them."""
    from clipsvd.train import class_logits

    plain = load_model(name, pretrained, 0)
    loaded = load_model(name, pretrained, 0)
    adapter = attach("cocoop", loaded.model, {}, tokenizer=loaded.tokenizer)
    size = loaded.image_size
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(10.0)
    with torch.no_grad():
        last = adapter.meta_net[2]
        last.weight.zero_()
        last.bias.zero_()
        feats = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)
        got = adapter.conditioned_logits(loaded, CLASSES, adapter.prompt_templates([]), feats,
                                         scale)
        text = encode_class_prompts(plain, CLASSES, ["a photo of a {}."])
        expected = class_logits(scale, feats, text)
        assert got.shape == (3, len(CLASSES))
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        last.bias.normal_(generator=torch.Generator().manual_seed(1))
        shifted = adapter.conditioned_logits(loaded, CLASSES, adapter.prompt_templates([]),
                                             feats, scale)
        assert (shifted - expected).abs().max() > 1e-3
        # each image's own shift reaches its own rows: scored alone, the same logits
        last.weight.normal_(generator=torch.Generator().manual_seed(2))
        together = adapter.conditioned_logits(loaded, CLASSES, adapter.prompt_templates([]),
                                              feats, scale)
        alone = torch.cat([adapter.conditioned_logits(loaded, CLASSES,
                                                      adapter.prompt_templates([]),
                                                      feats[i:i + 1], scale) for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-5)


def test_cocoop_trains_its_context_and_meta_network_and_saves_both(tmp_path):
    loaded = load_model("tiny-clip", None, 0)
    adapter = attach("cocoop", loaded.model, {}, tokenizer=loaded.tokenizer)
    trained = adapter.named_trainable()
    assert set(trained) == {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                            "meta_net.2.bias"}
    images = torch.rand(2, 3, loaded.image_size, loaded.image_size,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # tiny-clip's meta-network has 2 hidden units: keep them active
        adapter.meta_net[0].bias.fill_(1.0)
    feats = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)
    logits = adapter.conditioned_logits(loaded, CLASSES, adapter.prompt_templates([]), feats,
                                        torch.tensor(10.0))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = {k for k, p in trained.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(trained)
    frozen = [n for n, p in loaded.model.named_parameters()
              if p.requires_grad and p not in set(trained.values())]
    assert frozen == []
    adapter.save(tmp_path / "a.safetensors")
    again = load_model("tiny-clip", None, 0)
    other = attach("cocoop", again.model, {}, tokenizer=again.tokenizer)
    other.load(tmp_path / "a.safetensors")
    for key, p in other.named_trainable().items():
        assert torch.equal(p, trained[key]), key
