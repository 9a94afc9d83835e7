"""Table 8 (--full): the MiniGPT-4-shaped backbone on VQA."""

from freevlm.reproduce.tables.other_backbones import other_backbone_table

TABLE = other_backbone_table("minigpt4-llama", "vqa", "Table 8 — MiniGPT-4-shaped, VQA")
