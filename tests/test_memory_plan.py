"""The memory planner (bench/memory_plan.py) against what a real CPU step keeps for backward."""
import pytest
import torch

import setr
from bench import memory_plan
from train.parallelize import convert_sync_batchnorm

TINY = dict(head="pup", backbone="vit_tiny", num_classes=7, crop=32)  # no aux heads: 3x faster interpreted


def saved_for_backward_bytes(model, images, labels):
    """Bytes of the distinct storages autograd saves in a real forward (parameters and inputs
    excluded: the planner counts those in their own categories); runs the backward too."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), images, labels]}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in excluded:
            saved[st.data_ptr()] = st  # keeps it alive: no address is reused while counting
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(images, labels)
        loss = sum(losses.values())
    loss.backward()
    return sum(st.nbytes() for st in saved.values())


@pytest.mark.parametrize("impl", ["eager", "sdpa", "triton"])
def test_planned_activations_equal_the_bytes_saved_for_backward(impl):
    """Triton runs through the interpreter here, planned through the custom ops' fake versions."""
    plan = memory_plan.plan(TINY["head"], impl, batch=2, precision="fp32", crop=TINY["crop"],
                            backbone=TINY["backbone"], num_classes=TINY["num_classes"], aux=False)
    model = setr.build_setr(TINY["head"], TINY["backbone"], TINY["num_classes"], img_size=TINY["crop"], impl=impl, aux=False)
    convert_sync_batchnorm(model.train())
    images = torch.randn(2, 3, TINY["crop"], TINY["crop"])
    labels = torch.randint(0, TINY["num_classes"], (2, TINY["crop"], TINY["crop"]))
    real = saved_for_backward_bytes(model, images, labels)
    assert real > 0
    assert plan["saved_activations"] == pytest.approx(real, rel=0.05), (plan["saved_activations"], real)
