"""ModelConfig: the `model:` section of a CLIP training job."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.presets import CLIP_PRESETS, TinyConfig
from plumbing.config import require


@dataclass
class ModelConfig:
    name: str = "openai/clip-vit-base-patch32"
    """HF hub id or local folder of a CLIPModel with its tokenizer and image processor."""
    preset: str = ""
    """Build a random-init CLIP into <run.dir>/base-model and load it from there (offline): "tiny" (shaped by model.tiny), "vit-b-32" or "vit-l-14" (OpenAI's shapes)."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    head: str = "linear"
    """Projection heads: "linear" or "mlp" (residual, hidden size head_hidden)."""
    head_dim: int = 0
    """Output size of both heads; 0 keeps CLIP's projection_dim (the heads then start as the identity)."""
    head_hidden: int = 0
    """Hidden size of the MLP heads; 0 uses the input size."""
    freeze_vision: bool = False
    """Freeze the whole vision tower (embeddings, layers, visual projection)."""
    freeze_text: bool = False
    """Freeze the whole text tower (embeddings, layers, text projection)."""
    vision_trainable_layers: int = -1
    """Train only the last N vision layers (plus final norm and projection); -1 trains all."""
    text_trainable_layers: int = -1
    """Train only the last N text layers (plus final norm and projection); -1 trains all."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30 % more compute)."""

    def __post_init__(self) -> None:
        require(self.preset in ("", *CLIP_PRESETS), self, "preset", '"" or ' + ", ".join(CLIP_PRESETS))
        require(self.head in ("linear", "mlp"), self, "head", '"linear" or "mlp"')
        require(self.head_dim >= 0 and self.head_hidden >= 0, self, "head_dim", "sizes >= 0")
        require(
            self.vision_trainable_layers >= -1, self, "vision_trainable_layers", "-1 (all) or a count >= 0"
        )
        require(self.text_trainable_layers >= -1, self, "text_trainable_layers", "-1 (all) or a count >= 0")
