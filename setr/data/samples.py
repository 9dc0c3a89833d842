"""What the DataLoader indexes: training samples by global position, evaluation samples.

Training is indexed by a global sample position p = 0, 1, 2, ... (never by dataset index): the
sample at p is dataset item permutation(seed, epoch = p // N)[p % N], transformed with an RNG
seeded by (seed, p). So the data a run sees is a pure function of (seed, p): the same on any
worker count, rank count or restart, and a run resumed at iteration k (start_pos = k * global
batch) continues with exactly the samples it would have seen.
"""
import numpy as np
import torch

from .datasets import DataError
from .transforms import check_crop_size, eval_transform, to_pair, train_transform


_PERM_TAG, _AUG_TAG = 0x9E3, 0xA06


class TrainSamples(torch.utils.data.Dataset):
    """mmseg's training pipeline over a raw dataset, indexed by global position.

    dataset: a raw dataset (items (image uint8 (H, W, 3), label (H, W), name)).
    crop_size: int or (h, w), multiples of the patch size 16. scale, ratio_range, cat_max_ratio: the
    RandomResize / RandomCrop parameters (mmseg's ADE20K: (2048, 512), (0.5, 2.0), 0.75; its
    Cityscapes 768x768: (2049, 1025), crop 768; Pascal Context: (520, 520), crop 480).
    skip_corrupt: on a DataError (unreadable / inconsistent sample) note the file (returned by
    `collate`, warned about once by the training loop) and use the next dataset item instead
    (deterministic: the same replacement on every run, rank count and restart); otherwise raise.
    Item `pos` -> (image float32 (3, ch, cw) normalized, padded with 0; label int64 (ch, cw)
    padded with ignore_index). `collate` batches items and also returns the bad samples met
    while loading them, [(path, problem)], wherever the loading ran (DataLoader worker or not).
    """

    def __init__(self, dataset, crop_size, seed, scale=(2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio=0.75, skip_corrupt=False):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be 0 < lo <= hi, got {ratio_range}")
        self.dataset = dataset
        self.crop_size = check_crop_size(crop_size)
        self.seed = int(seed)
        self.scale = to_pair(scale, "scale")
        self.ratio_range = (float(lo), float(hi))
        self.cat_max_ratio = float(cat_max_ratio)
        self.skip_corrupt = bool(skip_corrupt)
        self.ignore_index = dataset.ignore_index
        self.num_classes = dataset.num_classes
        self._bad = []  # (path, problem) of the samples skipped since the last collate
        self._perm_epoch, self._perm = None, None

    def __len__(self):
        return 1 << 62

    def dataset_index(self, pos):
        """Dataset item at global position `pos`."""
        epoch, k = divmod(int(pos), len(self.dataset))
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([_PERM_TAG, self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.dataset)), epoch
        return int(self._perm[k])

    def _load(self, index, pos):
        n = len(self.dataset)
        load = getattr(self.dataset, "load", self.dataset.__getitem__)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return load(i)
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                self._bad.append((e.path, e.problem))  # reported once per file by the training loop
        raise DataError(getattr(self.dataset, "root", "<dataset>"),
                        f"all {n} samples failed to load")

    def __getitem__(self, pos):
        if pos < 0:
            raise IndexError(f"sample positions are >= 0, got {pos}")
        image, label, _ = self._load(self.dataset_index(pos), pos)
        rng = np.random.default_rng([_AUG_TAG, self.seed, int(pos)])
        return train_transform(image, label, rng, self.crop_size, self.scale, self.ratio_range,
                               self.cat_max_ratio, ignore_index=self.ignore_index)

    def collate(self, items):
        """DataLoader collate_fn: (images (B, 3, ch, cw), labels (B, ch, cw), bad samples met)."""
        images, labels = torch.utils.data.default_collate(items)
        bad, self._bad = self._bad, []
        return images, labels, bad


class PositionSampler(torch.utils.data.Sampler):
    """Infinite sampler of global sample positions for one rank.

    Global batch of iteration it: positions [it * G, (it + 1) * G) with
    G = batch_per_rank * world_size * accum_steps; micro-step m of rank r takes
    it * G + (m * world_size + r) * batch_per_rank + [0, batch_per_rank). Yields single
    positions in the order this rank consumes them, starting with the iteration that contains
    start_pos: use with DataLoader(batch_size=batch_per_rank, sampler=...). Resume at
    iteration k with start_pos = k * G.
    """

    def __init__(self, start_pos, rank, world_size, batch_per_rank, accum_steps=1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if batch_per_rank < 1 or accum_steps < 1 or start_pos < 0:
            raise ValueError(f"need batch_per_rank >= 1, accum_steps >= 1, start_pos >= 0; got "
                             f"{batch_per_rank}, {accum_steps}, {start_pos}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_per_rank, self.accum_steps = int(batch_per_rank), int(accum_steps)
        self.global_batch = self.batch_per_rank * self.world_size * self.accum_steps
        self.start_iter = int(start_pos) // self.global_batch

    def micro_batch(self, it, micro):
        """Positions of this rank's micro-batch `micro` of iteration `it`."""
        first = it * self.global_batch + (micro * self.world_size + self.rank) * self.batch_per_rank
        return list(range(first, first + self.batch_per_rank))

    def __iter__(self):
        it = self.start_iter
        while True:
            for micro in range(self.accum_steps):
                yield from self.micro_batch(it, micro)
            it += 1


class EvalSamples(torch.utils.data.Dataset):
    """mmseg's test pipeline over a raw dataset.

    Item i -> (image float32 (3, h', w'): resized to eval_size(H, W, scale, short_min) (keep-ratio
    into `scale`; short_min > 0: the SETR repository's Pascal Context rule) and normalized,
    label int64 (H, W) at the original size, name). `raw(i)` gives the dataset item itself
    (for multi-scale + flip testing, which rescales the original image by the same rule:
    setr.inference.aug_size).
    """

    def __init__(self, dataset, scale=(2048, 512), short_min=0):
        self.dataset = dataset
        self.scale = to_pair(scale, "scale")
        self.short_min = int(short_min)
        self.num_classes = dataset.num_classes
        self.ignore_index = dataset.ignore_index
        self.class_names = dataset.class_names
        self.palette = dataset.palette

    def __len__(self):
        return len(self.dataset)

    def raw(self, index):
        return self.dataset[index]

    def __getitem__(self, index):
        image, label, name = self.dataset[index]
        return eval_transform(image, self.scale, self.short_min), torch.from_numpy(label), name
