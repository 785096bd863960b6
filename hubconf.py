"""torch.hub entry points: torch.hub.load("path/to/this/repo", "from_pretrained", "runs/demo_pt/export/encoder",
source="local") returns an exported encoder or classifier (models/hub.py)."""

dependencies = ["torch", "einops", "safetensors"]

from models.hub import from_pretrained  # noqa: E402,F401
