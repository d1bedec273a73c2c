"""Adapters under mixed precision, emulated with CPU bf16 autocast (which lowers linear, addmm
and matmul to bf16 as CUDA autocast does): at initialisation every method's model is the
unadapted model under the same autocast, and CLIP-SVD's singular values stay float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipsvd.adapters import SVDAdapter, attach
from clipsvd.models import encode_class_prompts, encode_images, load_model

PROMPTS = ["a photo of a {}."]
CLASSES = ["glioma", "meningioma", "pituitary tumor"]


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _features(loaded, images):
    return encode_images(loaded.model, images), encode_class_prompts(loaded, CLASSES, PROMPTS)


@pytest.mark.parametrize("method", ["clip_svd", "clip_lora", "comp_lora"])
def test_each_method_at_init_is_the_unadapted_model_under_bf16_autocast(method):
    """Issue 22.3: CLIP-SVD's recomposed weights came out of addmm under autocast as bf16, and
    open_clip takes the text tower's cast dtype from resblocks[0].mlp.c_fc.weight, so the whole
    text residual stream ran in bf16 for CLIP-SVD only (text features off by ~3e-2 at init).
    Each method's model at initialisation must give exactly the unadapted model's image and
    text features under the same autocast, with the text tower's cast dtype unchanged.
    Catches: the recomposed weight left in the autocast dtype (CLIP-SVD: addmm under autocast
    without the cast back), a LoRA/Comp-LoRA branch that is not exactly zero at init (B not
    zero)."""
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = load_model("tiny-clip", None, init_seed=3)
    adapted = load_model("tiny-clip", None, init_seed=3)
    adapter = attach(method, adapted.model, {})
    with torch.no_grad(), _bf16():
        expected = _features(base, images)
        with adapter.cached():
            cast = adapted.model.transformer.get_cast_dtype()
            found = _features(adapted, images)
    assert cast == base.model.transformer.get_cast_dtype() == torch.float32
    assert found[0].dtype == expected[0].dtype and found[1].dtype == expected[1].dtype
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


def test_clip_svd_recomposed_training_step_at_init_matches_under_bf16_autocast():
    """With gradients on (a training step's forward) and every weight recomposed, CLIP-SVD at
    initialisation is still bit-identical to the unadapted model under bf16 autocast. Catches
    the recomposition under autocast, which only shows in grad mode on a cached weight."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = load_model("tiny-clip", None, init_seed=3)
    adapted = load_model("tiny-clip", None, init_seed=3)
    adapter = attach("clip_svd", adapted.model, {"execution": "recompose"})
    with torch.no_grad(), _bf16():
        expected = _features(base, images)
    with _bf16(), adapter.cached():
        found = _features(adapted, images)
    assert torch.equal(found[0].detach(), expected[0]) and torch.equal(found[1].detach(),
                                                                      expected[1])


def _bf16_representable(values: torch.Tensor) -> torch.Tensor:
    return values == values.to(torch.bfloat16).float()


def test_singular_values_stay_float32_in_a_bf16_step():
    """Issue 16.5: under bf16 autocast the factored layers multiplied by s rounded to bf16
    (8-bit mantissa, ~0.4 % steps) and the recomposed weights were bf16. In one bf16 training
    step (CPU autocast, MLP layers factored, attention recomposed): every s and its gradient
    are float32 and the gradient is not rounded to bf16 (it would be, were s multiplied in
    bf16); the recomposed weights are float32 and, at initialisation, exactly the pretrained
    ones (not rounded through bf16); the step changes s in float32. Catches `s.to(x.dtype)`
    in the factored form and the recomposition under autocast."""
    torch.manual_seed(0)
    loaded = load_model("tiny-clip", None, init_seed=0)
    pretrained = loaded.model.visual.transformer.resblocks[0].attn.out_proj.weight.detach().clone()
    adapter = SVDAdapter.attach(loaded.model, {"execution": "factored"})
    loaded.model.train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 0])
    before = {key: s.detach().clone() for key, s in adapter.named_trainable().items()}
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    with _bf16(), adapter.cached():
        recomposed = loaded.model.visual.transformer.resblocks[0].attn.out_proj.weight
        image, text = _features(loaded, images)
        loss = F.cross_entropy(100 * image.float() @ text.float().t(), target)
        loss.backward()
    assert recomposed.dtype == torch.float32  # and not rounded to bf16 on the way:
    assert torch.equal(recomposed.detach(), pretrained)
    optimizer.step()
    grads = {key: s.grad for key, s in adapter.named_trainable().items()}
    assert all(s.dtype == torch.float32 for s in adapter.trainable_parameters())
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    factored = [key for key in grads if key.endswith(("mlp_fc", "mlp_proj"))]
    assert len(factored) == 8
    for key in factored:  # a bf16 product would leave every entry on the bf16 grid
        assert not bool(_bf16_representable(grads[key]).all()), key
    moved = [key for key, s in adapter.named_trainable().items()
             if not torch.equal(s.detach(), before[key])]
    assert moved and not bool(_bf16_representable(
        adapter.named_trainable()[moved[0]].detach() - before[moved[0]]).all())
