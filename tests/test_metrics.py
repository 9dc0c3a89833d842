"""SegMetric against hand-computed confusion matrices; distributed reduction over gloo."""
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from setr.metrics import SegMetric

# label / prediction of one image, 4 classes, 255 = ignore; class 3 is absent from the labels,
# and predicted only on an ignored pixel (so it is absent from both after masking).
LABEL = np.array([[0, 0, 1, 1],
                  [0, 2, 2, 255],
                  [1, 1, 2, 255]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 2],
                 [1, 0, 2, 3]])
# Confusion matrix over the 10 labelled pixels (rows label, columns prediction), by hand:
#            p0 p1 p2 p3
#   label 0   2  1  0  0     label area 3
#   label 1   1  3  0  0     label area 4
#   label 2   1  0  2  0     label area 3
#   label 3   0  0  0  0     label area 0
# pred area   4  4  2  0; intersection 2 3 2 0; union = pred + label - inter = 5 5 3 0.


def test_hand_computed_confusion_matrix():
    m = SegMetric(4, ignore_index=255, class_names=["a", "b", "c", "d"])
    m.update(PRED, LABEL)
    assert m.area_intersect.tolist() == [2, 3, 2, 0]
    assert m.counts[1].tolist() == [4, 4, 2, 0]  # prediction areas
    assert m.area_label.tolist() == [3, 4, 3, 0]
    assert m.area_union.tolist() == [5, 5, 3, 0]
    r = m.compute()
    assert r["IoU"][:3] == pytest.approx([40.0, 60.0, 200 / 3])
    assert math.isnan(r["IoU"][3]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == pytest.approx((40 + 60 + 200 / 3) / 3)  # NaN class excluded
    assert r["Acc"][:3] == pytest.approx([200 / 3, 75.0, 200 / 3])
    assert r["mAcc"] == pytest.approx((200 / 3 + 75 + 200 / 3) / 3)
    assert r["aAcc"] == pytest.approx(70.0)
    assert r["per_class"][1] == dict(name="b", IoU=pytest.approx(60.0), Acc=pytest.approx(75.0),
                                     intersect=3, union=5, label_area=4)
    lines = r["table"].splitlines()
    assert any(line.startswith("|") and line.split("|")[1].strip() == "d" and "nan" in line
               for line in lines)
    assert "mIoU 55.56" in r["table"] and "aAcc 70.00" in r["table"]


def test_class_only_predicted_has_zero_iou_and_no_accuracy():
    m = SegMetric(3, ignore_index=255)
    m.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 0]]))
    r = m.compute()
    # I = [2, 0, 0], pred = [2, 2, 0], label = [4, 0, 0], union = [4, 2, 0]
    assert r["IoU"][:2] == [50.0, 0.0] and math.isnan(r["IoU"][2])
    assert r["mIoU"] == 25.0
    assert r["Acc"][0] == 50.0 and math.isnan(r["Acc"][1]) and r["mAcc"] == 50.0
    assert r["aAcc"] == 50.0


def test_accumulates_over_the_split_not_per_image():
    m = SegMetric(2, ignore_index=255)
    m.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    m.update(np.ones((2, 2), dtype=np.int64), np.array([[0, 1], [1, 1]]))
    # pooled: I = [4, 3], pred = [4, 4], label = [5, 3] -> IoU = [80, 75]
    r = m.compute()
    assert r["IoU"] == [80.0, 75.0] and r["mIoU"] == 77.5 and r["num_images"] == 2
    batched = SegMetric(2, ignore_index=255)
    batched.update(torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]]),
                   torch.tensor([[[0, 0], [0, 0]], [[0, 1], [1, 1]]]))
    assert torch.equal(batched.counts, m.counts) and batched.num_images == 2


def test_random_against_confusion_matrix():
    rng = np.random.default_rng(0)
    C = 7
    label = rng.integers(0, C, (3, 31, 17))
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, C, label.shape)
    keep = label != 255
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (label[keep], pred[keep]), 1)
    m = SegMetric(C, 255)
    for i in range(3):
        m.update(pred[i], label[i])
    r = m.compute()
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    assert r["IoU"] == pytest.approx((inter / union * 100).tolist())
    assert r["aAcc"] == pytest.approx(inter.sum() / keep.sum() * 100)


def test_bad_inputs():
    m = SegMetric(4, 255)
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) != label shape \(3, 2\)"):
        m.update(np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"label value 7 is outside \[0, 4\)"):
        m.update(np.zeros((2, 2), dtype=np.int64), np.array([[0, 7], [255, 1]]))
    with pytest.raises(ValueError, match=r"predicted class 4 is outside \[0, 4\)"):
        m.update(np.array([[0, 4], [1, 1]]), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="argmax"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    assert m.counts.sum() == 0  # nothing half-counted
    with pytest.raises(ValueError, match="2 class names"):
        SegMetric(4, 255, class_names=["a", "b"])


def _reduce_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    m = SegMetric(4, 255)
    rows = slice(0, 2) if rank == 0 else slice(2, 3)
    m.update(PRED[rows], LABEL[rows])
    m.all_reduce()
    torch.save({"counts": m.counts, "num_images": m.num_images},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_reduce_across_two_ranks(tmp_path):
    ctx = mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail("the two gloo workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            p.kill()
            p.join(10)
        assert not any(p.is_alive() for p in ctx.processes)
    full = SegMetric(4, 255)
    full.update(PRED[0:2], LABEL[0:2])
    full.update(PRED[2:3], LABEL[2:3])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["counts"], full.counts) and got["num_images"] == 2
