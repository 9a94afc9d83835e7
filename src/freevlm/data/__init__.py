"""Dataset loaders: each reads one official annotation format into the records of `records.py`."""

from freevlm.data.coco import load_coco_captions, load_coco_karpathy
from freevlm.data.gqa import load_gqa
from freevlm.data.images import check_images, load_image
from freevlm.data.nocaps import load_nocaps
from freevlm.data.records import CaptionSample, DialogSample, VQASample
from freevlm.data.visdial import load_visdial
from freevlm.data.vizwiz import load_vizwiz
from freevlm.data.vqa import load_vqa

__all__ = [
    "CaptionSample",
    "DialogSample",
    "VQASample",
    "check_images",
    "load_coco_captions",
    "load_coco_karpathy",
    "load_gqa",
    "load_image",
    "load_nocaps",
    "load_visdial",
    "load_vizwiz",
    "load_vqa",
]
