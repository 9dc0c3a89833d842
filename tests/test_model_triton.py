"""The model with impl='triton' (our kernels; interpreter on CPU) matches impl='eager'."""
import pytest
import torch

import setr


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_triton_model_matches_eager(head):
    torch.manual_seed(3)
    eager = setr.build_setr(head, backbone="vit_tiny", num_classes=7, img_size=64, impl="eager")
    ours = setr.build_setr(head, backbone="vit_tiny", num_classes=7, img_size=64, impl="triton")
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 48)
    labels = torch.randint(0, 7, (2, 64, 48))
    labels[0, :5] = 255

    for model in (eager, ours):
        model.train()
        model.zero_grad()
        model.losses_ = model(x, labels)
        sum(model.losses_.values()).backward()
    for k in eager.losses_:
        torch.testing.assert_close(ours.losses_[k], eager.losses_[k], rtol=1e-4, atol=1e-5, msg=k)
    for (name, p_ours), p_eager in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_ours.grad, p_eager.grad, rtol=1e-3, atol=1e-5, msg=name)

    eager.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), eager(x), rtol=1e-4, atol=1e-4)


def test_per_op_override():
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=32,
                            impl={"attention": "triton", "layer_norm": "eager"})
    assert model.impl == {"attention": "triton", "layer_norm": "eager", "upsample": "eager", "loss": "eager"}
    assert model.backbone.layers[0].attn.attn.impl == "triton"
    assert model.backbone.layers[0].ln1.impl == "eager"
    assert not model.decode_head.classify_first
