"""CLIPFineTuner: a Hugging Face CLIPModel plus image and text projection heads into one shared space
and a learnable temperature. Saved as plain HF folders (safetensors only, no pickle)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from plumbing.config import require
from plumbing.errors import UserError
from trainer.tiny import TinyConfig

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "finetuner.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so that logits stay below 100


@dataclass
class ModelConfig:
    name: str = "openai/clip-vit-base-patch32"
    """HF hub id or local folder of a CLIPModel with its tokenizer and image processor."""
    preset: str = ""
    """"tiny": build a tiny random-init CLIP into <run.dir>/base-model and load it from there (offline)."""
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
        require(self.preset in ("", "tiny"), self, "preset", '"" or "tiny"')
        require(self.head in ("linear", "mlp"), self, "head", '"linear" or "mlp"')
        require(self.head_dim >= 0 and self.head_hidden >= 0, self, "head_dim", "sizes >= 0")
        require(
            self.vision_trainable_layers >= -1, self, "vision_trainable_layers", "-1 (all) or a count >= 0"
        )
        require(self.text_trainable_layers >= -1, self, "text_trainable_layers", "-1 (all) or a count >= 0")


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    in_dim: int
    out_dim: int
    hidden: int


class ProjectionHead(nn.Module):
    """Linear, or a residual MLP. When out == in it starts as the identity, so a pretrained CLIP keeps
    its zero-shot alignment at step 0 (an MLP's last layer starts at zero)."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.residual = spec.in_dim == spec.out_dim
        if spec.kind == "linear":
            self.net: nn.Module = nn.Linear(spec.in_dim, spec.out_dim)
            if self.residual:
                nn.init.zeros_(self.net.weight)
                nn.init.zeros_(self.net.bias)
        else:
            hidden = spec.hidden or spec.in_dim
            self.net = nn.Sequential(
                nn.Linear(spec.in_dim, hidden), nn.GELU(), nn.Linear(hidden, spec.out_dim)
            )
            if self.residual:
                nn.init.zeros_(self.net[2].weight)
                nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return x + y if self.residual else y


class CLIPFineTuner(nn.Module):
    """`forward` returns L2-normalised image and text embeddings (either may be None) and the logit
    scale. The temperature is shaped [1], not 0-dim: DeepSpeed 0.19.x mishandles 0-dim parameters
    (../shared/notes/stack-on-cpu.md); CLIP's own 0-dim logit_scale is frozen and only kept for export."""

    def __init__(self, clip: Any, spec: HeadSpec) -> None:
        super().__init__()
        self.clip = clip
        self.spec = spec
        self.image_head = ProjectionHead(spec)
        self.text_head = ProjectionHead(spec)
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone().reshape(1).float())
        clip.logit_scale.requires_grad_(False)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.image_head(self.clip.visual_projection(pooled)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.text_head(self.clip.text_projection(pooled)), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        return image, text, self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()

    # ------------------------------------------------------------------ saving and loading

    def heads_state(self) -> dict[str, torch.Tensor]:
        state = {f"image_head.{k}": v for k, v in self.image_head.state_dict().items()}
        state.update({f"text_head.{k}": v for k, v in self.text_head.state_dict().items()})
        state["logit_scale"] = self.logit_scale.detach()
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    def save_pretrained(self, folder: Path, tokenizer: Any, image_processor: Any) -> None:
        """HF folders as they are: folder/ (CLIPModel), folder/text_encoder/ (CLIPTextModel), the
        tokenizer and image processor in both, and the heads + temperature as safetensors."""
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():  # CLIPModel.from_pretrained users then get our temperature too
            self.clip.logit_scale.copy_(self.logit_scale.detach().reshape(()))
        self.clip.save_pretrained(folder, safe_serialization=True)
        self.clip.text_model.save_pretrained(
            folder / "text_encoder", safe_serialization=True
        )  # a CLIPTextModel
        for target in (folder, folder / "text_encoder", folder / "tokenizer"):
            tokenizer.save_pretrained(target)
        image_processor.save_pretrained(folder)
        save_file(self.heads_state(), str(folder / HEADS_FILE))
        spec = {
            "kind": self.spec.kind,
            "in_dim": self.spec.in_dim,
            "out_dim": self.spec.out_dim,
            "hidden": self.spec.hidden,
        }
        (folder / HEADS_CONFIG).write_text(json.dumps({"heads": spec}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPFineTuner:
        """Load a trainer export: the CLIPModel, then the heads and temperature."""
        folder = Path(folder)
        if not (folder / HEADS_CONFIG).is_file() or not (folder / HEADS_FILE).is_file():
            raise UserError(
                f"{folder}: not a trainer export (no {HEADS_CONFIG} / {HEADS_FILE}: an export without heads)"
            )
        spec = HeadSpec(**json.loads((folder / HEADS_CONFIG).read_text())["heads"])
        model = cls(load_clip(str(folder)), spec)
        state = load_file(str(folder / HEADS_FILE))
        model.image_head.load_state_dict(
            {k[len("image_head.") :]: v for k, v in state.items() if k.startswith("image_head.")}
        )
        model.text_head.load_state_dict(
            {k[len("text_head.") :]: v for k, v in state.items() if k.startswith("text_head.")}
        )
        with torch.no_grad():
            model.logit_scale.copy_(state["logit_scale"])
        return model.eval()


def load_clip(name: str) -> Any:
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load CLIP {name!r} ({str(err).splitlines()[0][:160]}); offline, point model.name at a "
            "local folder or use model.preset=tiny"
        ) from None


def load_processors(name: str) -> tuple[Any, Any]:
    """The tokenizer and image processor saved beside a model (hub id or folder)."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(name), CLIPImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the tokenizer / image processor of {name!r} ({str(err).splitlines()[0][:160]})"
        ) from None


def build_finetuner(cfg: ModelConfig, source: str) -> CLIPFineTuner:
    clip = load_clip(source)
    if cfg.gradient_checkpointing:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    in_dim = clip.config.projection_dim
    return CLIPFineTuner(clip, HeadSpec(cfg.head, in_dim, cfg.head_dim or in_dim, cfg.head_hidden))
