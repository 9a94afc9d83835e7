"""Table 5 (--full): a MiniGPT-4-shaped backbone (BLIP-2 with a Llama LM), captioning."""

from freevlm.reproduce.tables.other_backbones import other_backbone_table

TABLE = other_backbone_table("minigpt4-llama", "caption",
                             "Table 5 — MiniGPT-4-shaped (BLIP-2 with a Llama LM), captioning")
