"""Table 7 (--full): InstructBLIP (Llama LM), captioning."""

from freevlm.reproduce.tables.other_backbones import other_backbone_table

TABLE = other_backbone_table("instructblip-llama", "caption", "Table 7 — InstructBLIP (Llama LM), captioning")
