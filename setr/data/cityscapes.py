"""Cityscapes (gtFine): the 19 evaluated classes, their colours, and the labelId -> trainId table.

Names and palette: mmsegmentation's ``CityscapesDataset`` (index k = trainId k).
LABEL_ID_TO_TRAIN_ID: cityscapesscripts' ``helpers/labels.py`` (``id`` -> ``trainId``), the table
its ``csCreateTrainIdLabelImgs`` uses to write the ``*_gtFine_labelTrainIds.png`` files mmseg reads;
every labelId in 0..33 not listed here has trainId 255 (ignored). 'license plate' (id -1) is never
drawn into a label image.
"""

CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle',
    'bicycle',
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
NUM_LABEL_IDS = 34  # labelIds 0 ('unlabeled') .. 33 ('bicycle')

assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
assert sorted(LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))
