"""Interpretation of CLIP-SVD (issue 9): known answers for hand-made changes, and the outputs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from clipsvd import config
from clipsvd.adapters import SVDAdapter, SVDConfig
from clipsvd.interpret import (aggregate_interpretations, decompose, head_table, interpret_run,
                               load_corpus, matrix_table, singular_value_table)
from clipsvd.interpret.spans import head_contributions
from clipsvd.models import load_model

WIDTH, HEADS = 64, 2  # tiny-clip vision: width 64, head_width 32
HEAD_DIM = WIDTH // HEADS


def _value_rows(model, layer: int) -> slice:
    return slice(2 * WIDTH, 3 * WIDTH)  # v block of the fused in_proj_weight


def test_corpus_is_shipped_and_large():
    texts = load_corpus()
    assert len(texts) >= 300
    assert len(set(texts)) == len(texts)
    assert all(not t.startswith("#") and t == t.strip() for t in texts)


def test_hand_changed_singular_value_is_ranked_first_and_given_to_its_head():
    """A block-structured value projection (head h's rows read only their own input block) has
    left singular vectors supported on one head's rows; changing one such singular value must
    rank vision layer 1's value projection first and attribute the change to that head only."""
    loaded = load_model("tiny-clip")
    model = loaded.model
    attn = model.visual.transformer.resblocks[1].attn
    generator = torch.Generator().manual_seed(3)
    block = torch.zeros(WIDTH, WIDTH)
    for h in range(HEADS):
        part = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        block[part, part] = torch.randn(HEAD_DIM, HEAD_DIM, generator=generator) * (1 + h)
    with torch.no_grad():
        attn.in_proj_weight[_value_rows(model, 1)] = block
    adapter = SVDAdapter.attach(model, SVDConfig())
    target = adapter.target("vision.layer1.v")
    u, s0, _ = target.factors()
    head_mass = torch.stack([u[h * HEAD_DIM:(h + 1) * HEAD_DIM].pow(2).sum(0)
                             for h in range(HEADS)])
    # a singular vector of head 1 (the larger block), not the largest singular value
    index = int(torch.nonzero(head_mass[1] > 0.999)[3])
    with torch.no_grad():
        target.s[index] += 0.5 * s0[index]
    values = singular_value_table(adapter)
    matrices = matrix_table(values)
    heads = head_table(adapter)
    assert values.iloc[0][["key", "index"]].tolist() == ["vision.layer1.v", index]
    assert values.iloc[0]["rel_delta"] == pytest.approx(0.5, rel=1e-5)
    assert (values["delta"].iloc[1:].abs() < 1e-6).all()
    assert matrices.iloc[0]["key"] == "vision.layer1.v"
    assert matrices.iloc[0]["rel_change"] > 0 and matrices.iloc[1]["rel_change"] == 0
    top = heads.iloc[0]
    assert (top["encoder"], top["layer"], top["head"]) == ("vision", 1, 1)
    assert top["v_abs"] == pytest.approx(0.5 * float(s0[index]), rel=1e-4)
    other = heads[(heads.encoder == "vision") & (heads.layer == 1) & (heads["head"] == 0)]
    assert float(other["v_abs"].iloc[0]) < 1e-5 and float(other["ov_change"].iloc[0]) < 1e-5
    assert (heads["ov_change"].iloc[1:] < 1e-5).all()


def test_generic_change_is_split_over_heads_by_rows_of_u():
    """Without structure, head h's share of a rank-one change is |Δs|·‖U[rows_h, i]‖."""
    loaded = load_model("tiny-clip")
    adapter = SVDAdapter.attach(loaded.model, SVDConfig(encoders=["vision"], matrices=["v", "out"]))
    target = adapter.target("vision.layer0.out")
    u, s0, vh = target.factors()
    with torch.no_grad():
        target.s[5] -= 0.3
    heads = head_table(adapter)
    layer0 = heads[heads.layer == 0].set_index("head")
    for h in range(HEADS):
        # out: head h owns columns, i.e. rows of Vh's transpose
        expected = 0.3 * float(vh[5, h * HEAD_DIM:(h + 1) * HEAD_DIM].norm())
        assert layer0.loc[h, "out_abs"] == pytest.approx(expected, rel=1e-4)
        assert layer0.loc[h, "v_abs"] == 0
    assert matrix_table(singular_value_table(adapter)).iloc[0]["key"] == "vision.layer0.out"


def test_decomposition_finds_the_planted_description_first():
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(40, 16))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    planted = 17
    direction = texts[planted] - texts.mean(0)
    direction /= np.linalg.norm(direction)
    amplitude = rng.normal(size=(300, 1)) * 3.0
    contributions = amplitude * direction + 0.2 * rng.normal(size=(300, 16)) + 5.0
    picks = decompose(contributions, texts, k=4)
    assert picks[0].index == planted
    assert picks[0].explained > 0.8
    assert len({p.index for p in picks}) == 4
    assert sum(p.explained for p in picks) <= 1 + 1e-9
    # removing the planted direction leaves nothing large to explain
    assert all(p.explained < 0.1 for p in picks[1:])


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-timm-clip"])
def test_head_contribution_is_what_ablating_the_head_removes(name):
    """With the final LayerNorm's σ held at its value on the full model (the decomposition's
    one approximation) and the last MLP switched off (no indirect effect), zeroing a head's
    output-projection columns removes exactly that head's computed contribution."""
    from clipsvd.interpret.spans import vision_parts

    model = load_model(name).model
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    parts = vision_parts(model)
    block = parts.blocks[-1]
    mlp_out = block.mlp.c_proj if name == "tiny-clip" else block.mlp.fc2
    out = block.attn.out_proj if name == "tiny-clip" else block.attn.proj
    with torch.no_grad():
        mlp_out.weight.zero_()
        mlp_out.bias.zero_()
    contributions = head_contributions(model, [images[:4], images[4:]], [-1])[1]
    assert contributions.shape == (6, HEADS, 32)
    norm = parts.final_norm
    fixed: dict[str, torch.Tensor] = {}

    def fixed_sigma(module, args, output):
        x = args[0]
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + module.eps)
        if "sigma" not in fixed:
            fixed["sigma"] = sigma
        return (x - x.mean(-1, keepdim=True)) / fixed["sigma"] * module.weight + module.bias

    handle = norm.register_forward_hook(fixed_sigma)
    try:
        with torch.no_grad():
            for h in range(HEADS):
                fixed.clear()
                full = model.encode_image(images).double().numpy()
                saved = out.weight.clone()
                out.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
                ablated = model.encode_image(images).double().numpy()
                out.weight.copy_(saved)
                np.testing.assert_allclose(full - ablated, contributions[:, h], rtol=1e-3,
                                           atol=1e-4 * np.abs(contributions[:, h]).max())
    finally:
        handle.remove()


def _toy_study(root, n_per_class: int = 6):
    """A prepared store, a split file and a study config for tiny-clip (no workflow)."""
    classes = ["cyst", "tumor"]
    store = root / "prepared" / "toy"
    store.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = n_per_class * len(classes)
    np.save(store / "images.npy", rng.integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8))
    ids = [f"img_{i:03d}" for i in range(n)]
    labels = [i % len(classes) for i in range(n)]
    pd.DataFrame({"sample_id": ids, "source_path": ids, "label": labels,
                  "class_name": [classes[i] for i in labels],
                  "split": ["train" if i < 4 else "test" for i in range(n)],
                  "group": ""}).to_csv(store / "index.csv", index=False)
    (store / "classes.json").write_text(json.dumps({"classes": classes}))
    (store / "provenance.json").write_text(json.dumps({"dataset": "toy"}))
    split = root / "split.json"
    split.write_text(json.dumps({"dataset": "toy", "classes": classes, "seed": 1, "shots": 2,
                                 "setting": "few_shot", "train": ids[:4], "val": ids[:2],
                                 "test": ids[4:]}))
    cfg = config.from_dict({"study": "toy", "device": "cpu", "methods": ["clip_svd"],
                            "datasets": [{"name": "toy", "format": "folder", "root": str(root)}],
                            "model": {"name": "tiny-clip"}, "clip_svd": {"layers": "all"}})
    return cfg, store, split


def _run_folder(root, cfg, seed: int, key: str, index: int, factor: float):
    run = root / "runs" / "toy" / "toy" / "clip_svd" / "few_shot" / "shots2" / f"seed{seed}"
    run.mkdir(parents=True)
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    training = cfg.training("clip_svd", "toy")
    adapter = SVDAdapter.attach(loaded.model, SVDConfig(encoders=training.encoders,
                                                       matrices=training.matrices,
                                                       layers=training.layers))
    adapter.save(run / "adapter.safetensors")
    # change one singular value by hand in the saved file, keeping its header
    tensors = load_file(run / "adapter.safetensors")
    header = SVDAdapter.read_metadata(run / "adapter.safetensors")
    tensors[key][index] *= factor
    save_file(tensors, str(run / "adapter.safetensors"), metadata=header)
    return run


def test_interpret_run_writes_well_formed_outputs_and_aggregates(tmp_path):
    cfg, store, split = _toy_study(tmp_path)
    runs = [_run_folder(tmp_path, cfg, seed, "vision.layer1.v", 0, factor)
            for seed, factor in ((1, 1.5), (2, 1.4))]
    record = interpret_run(cfg, runs[0], split, store, runs[0] / "interpret", k=3)
    out = runs[0] / "interpret"
    for name in ("singular_value_changes.csv", "matrix_changes.csv", "head_changes.csv",
                 "head_descriptions.csv", "head_spans.csv", "matrix_heatmap.png",
                 "head_heatmap.png", "summary.md", "interpret.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert record["top_matrix"]["key"] == "vision.layer1.v"
    assert record["top_matrix"]["rel_change"] > 0
    assert record["n_images"] == 8 and record["span_layers"] == [0, 1]
    matrices = pd.read_csv(out / "matrix_changes.csv")
    assert matrices["rank"].tolist() == list(range(1, len(matrices) + 1))
    assert len(matrices) == 24 and matrices.iloc[0]["key"] == "vision.layer1.v"
    heads = pd.read_csv(out / "head_changes.csv")
    assert len(heads) == 8 and heads.iloc[0]["layer"] == 1 and heads.iloc[0]["encoder"] == "vision"
    descriptions = pd.read_csv(out / "head_descriptions.csv")
    assert set(descriptions["model"]) == {"original", "adapted"}
    assert len(descriptions) == 2 * 2 * 2 * 3  # layers × heads × models × k
    assert descriptions["explained"].between(0, 1).all()
    corpus = set(load_corpus())
    assert set(descriptions["description"]) <= corpus
    spans = pd.read_csv(out / "head_spans.csv")
    assert len(spans) == 4 and spans["overlap"].between(0, 3).all()
    # only vision layer 1's value projection changed: vision layer 0 heads keep their words
    # up to the text encoder (unchanged too) => identical descriptions
    layer0 = spans[spans.layer == 0]
    assert (layer0["overlap"] == 3).all()
    summary = (out / "summary.md").read_text()
    assert "vision.layer1.v" in summary and "| # | original | % | adapted | % |" in summary

    interpret_run(cfg, runs[1], split, store, runs[1] / "interpret", k=3)
    result = aggregate_interpretations(runs + [tmp_path / "missing"], tmp_path / "agg")
    assert len(result["groups"]) == 1 and result["groups"][0]["n_seeds"] == 2
    over = pd.read_csv(tmp_path / "agg" / "matrix_changes_over_seeds.csv")
    first = over.iloc[0]
    assert first["key"] == "vision.layer1.v" and first["n_seeds"] == 2
    assert first["rel_change_std"] > 0
    assert (tmp_path / "agg" / result["groups"][0]["heatmap"]).is_file()
    assert "mean ± sample std" in (tmp_path / "agg" / "summary.md").read_text().lower() or \
        "Mean ± sample std" in (tmp_path / "agg" / "summary.md").read_text()
    from clipsvd.report.html import interpretation_section

    section = interpretation_section(tmp_path / "agg", result)
    assert "id='interpretation'" in section and "data:image/png;base64," in section
    assert "vision.layer1.v" in section and "layer 1, head" in section


def _demo_images(loaded, per_class: int, seed_offset: int):
    """Held-out demo-generator images at the model's input size, normalised, with labels."""
    from clipsvd import pretrain
    from clipsvd.models import PRETRAINED_DIR

    recipe = pretrain.load_recipe(PRETRAINED_DIR / "mini-clip-medmnist.yaml")
    (demo,) = [s for s in recipe.sources if s.demo]
    demo = dataclasses.replace(demo, demo={**demo.demo, "seed": demo.demo["seed"] + seed_offset})
    source = pretrain.open_source(demo, None, loaded.image_size, held_out={"per_class": per_class})
    images = torch.from_numpy(source.get(np.arange(len(source)))).float().div(255)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    return (images - mean) / std, torch.from_numpy(source.labels), source.class_names


def test_head_ranking_of_a_real_adaptation_is_the_models_own():
    """CLIP-SVD on the pretrained miniature, trained on 4 demo images per class: the head
    ranking equals one computed independently from the weights the adapted model really uses
    (read through its parametrisation, float32), head by head: OV_h = W_out[:, cols_h] ·
    W_v[rows_h, :]. On pretrained weights the heads changed unequally (the first ranked at
    least 1.2 times the last), so the order means something. Caught when tried: ov_change
    taken from the value rows alone (0.593 where the head's circuit changed by 0.323); the
    output projection split by rows instead of columns (the slices no longer multiply)."""
    import torch.nn.functional as F

    from clipsvd.models import encode_class_prompts, encode_images

    loaded = load_model("mini-clip", "medmnist")
    train_x, train_y, names = _demo_images(loaded, 4, seed_offset=7)
    pretrained = {}
    blocks = loaded.model.visual.transformer.resblocks
    width = blocks[0].attn.embed_dim
    head_dim = width // blocks[0].attn.num_heads

    def ov(layer: int, head: int) -> torch.Tensor:
        attn = blocks[layer].attn
        rows = slice(2 * width + head * head_dim, 2 * width + (head + 1) * head_dim)
        cols = slice(head * head_dim, (head + 1) * head_dim)
        return (attn.out_proj.weight[:, cols] @ attn.in_proj_weight[rows]).detach().double()

    for layer in range(len(blocks)):
        for head in range(width // head_dim):
            pretrained[(layer, head)] = ov(layer, head)
    adapter = SVDAdapter.attach(loaded.model, SVDConfig(encoders=["vision"]))
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=0.005, weight_decay=0.0)
    scale = loaded.model.logit_scale.detach().exp()
    loaded.model.train()
    for _ in range(20):
        with adapter.cached():
            text = encode_class_prompts(loaded, names, ["a CT scan showing {}."])
            loss = F.cross_entropy(scale * encode_images(loaded.model, train_x) @ text.t(), train_y)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    loaded.model.eval()
    heads = head_table(adapter)
    heads = heads[heads.encoder == "vision"].reset_index(drop=True)
    with adapter.cached():
        measured = {key: float((ov(*key) - before).norm() / before.norm())
                    for key, before in pretrained.items()}
    for row in heads.itertuples():
        assert row.ov_change == pytest.approx(measured[(row.layer, row.head)], rel=1e-3)
    order = sorted(measured, key=lambda key: -measured[key])
    assert [(r.layer, r.head) for r in heads.itertuples()] == order
    assert heads["ov_change"].iloc[0] >= 1.2 * heads["ov_change"].iloc[-1]


def test_heatmap_cells_print_readably_at_page_width(tmp_path, monkeypatch):
    """The layers × matrices heatmap fits a printed page's width at its own size, its cell
    labels are 9 pt and plain decimals (a change of 160 % ± 50 reads `160` / `±50`, not
    `1.6e+02` / `±5e+01`). Caught when tried: the `.2g` labels, and panels side by side 15 in
    wide (labels ~4 pt once the figure is scaled to a page)."""
    from matplotlib import pyplot as plt

    from clipsvd.interpret import figures

    rows = [{"encoder": encoder, "matrix": matrix, "layer": layer,
             "rel_change": 1.6 if (layer, matrix) == (0, "q") else 0.0123 * (layer + 1),
             "rel_change_std": 0.5 if (layer, matrix) == (0, "q") else 0.004}
            for encoder in ("vision", "text") for matrix in figures.MATRICES
            for layer in range(4)]
    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    path = figures.matrix_heatmap(pd.DataFrame(rows), {"vision": 4, "text": 4},
                                  tmp_path / "m.png", spread="rel_change_std")
    assert path.stat().st_size > 0
    (fig,) = shown
    assert fig.get_size_inches()[0] <= 7.0
    cells = [t for ax in fig.axes for t in ax.texts]
    assert len(cells) == 2 * 6 * 4
    assert all(t.get_fontsize() >= 9 for t in cells)
    labels = {t.get_text() for t in cells}
    assert "160\n±50" in labels and "1.2\n±0.40" in labels
    assert not any("e+" in label or "e-" in label for label in labels)
