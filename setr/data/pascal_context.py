"""Pascal Context (VOC2010 + the 59 most frequent context classes): class names and colours.

The label PNGs are mmseg's converted ones (``tools/dataset_converters/pascal_context.py``): 0 is
background, 1..59 the classes in the order below. Two benchmarks read them:
  PASCAL_CONTEXT_CLASSES (60, background included, label k = class k): mmseg's
      ``PascalContextDataset``, what the SETR paper trains and scores (num_classes=60).
  PASCAL_CONTEXT59_CLASSES (59, ``reduce_zero_label``: background ignored, label k = class k-1):
      mmseg's ``PascalContextDataset59``.
Names and palettes are mmseg 1.x's (the 0.x / SETR-repository name order did not match the
converter's ids; only the names changed, not the ids).
"""
from .ade20k import ADE20K_PALETTE

PASCAL_CONTEXT_CLASSES = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat',
    'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass',
    'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate',
    'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow',
    'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window', 'wood',
)

# mmseg's PascalContextDataset palette: the first 60 colours of its ADE20K palette
PASCAL_CONTEXT_PALETTE = ADE20K_PALETTE[:60]

# mmseg's PascalContextDataset59: the same classes and colours without background
PASCAL_CONTEXT59_CLASSES = PASCAL_CONTEXT_CLASSES[1:]
PASCAL_CONTEXT59_PALETTE = PASCAL_CONTEXT_PALETTE[1:]

assert len(PASCAL_CONTEXT_CLASSES) == len(PASCAL_CONTEXT_PALETTE) == 60
