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

PASCAL_CONTEXT_CLASSES = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat',
    'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass',
    'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate',
    'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow',
    'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window', 'wood',
)

PASCAL_CONTEXT_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
)

# mmseg's PascalContextDataset59: the same classes and colours without background
PASCAL_CONTEXT59_CLASSES = PASCAL_CONTEXT_CLASSES[1:]
PASCAL_CONTEXT59_PALETTE = PASCAL_CONTEXT_PALETTE[1:]

assert len(PASCAL_CONTEXT_CLASSES) == len(PASCAL_CONTEXT_PALETTE) == 60
