"""Reference manifests in tests/data, recorded from mmseg (0.30 and 1.2.2, patch_bias=True) and timm.

mmseg_setr_{naive,pup,mla}_keys.json   {key: shape} of mmseg's SETR ViT-L/16 ADE20K models, in order
mmseg_setr_cityscapes_keys.json        {head: {key: shape}} of mmseg 1.2.2's Cityscapes 768x768 configs' models
mmseg_setr_params.json                 parameter counts per part and per lr group of mmseg's optimizer
timm_vit_large_patch16_384_keys.json   {key: shape} of timm's vit_large_patch16_384
timm_to_mmseg_backbone_keymap.json     timm key -> mmseg backbone key (mmseg's vit2mmseg rules)
"""
import json
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def ref_json(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)
