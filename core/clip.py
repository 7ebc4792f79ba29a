"""CLIP as every stage loads it: a hub id, a local folder, or a trainer export, and one embedder.

A trainer export is a file format, read here: a CLIPModel folder, `text_encoder/` and `tokenizer/`
that diffusers-style loaders take, and the projection heads with the temperature
(`heads.safetensors` + `finetuner.json`). `CLIPFineTuner` is that model; `Embedder` turns images
and texts into its normalised embeddings with the trainer's evaluation preprocessing, so the
trainer's evaluation, retrieval and the sampler's CLIP score agree to the last digit.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from core.preprocess import Collate, ImageTransform
from plumbing.errors import UserError
from plumbing.files import tree_digest

log = logging.getLogger("core.clip")
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "finetuner.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so that logits stay below 100


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__


def load_clip(name: str) -> Any:
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load CLIP {name!r} ({_first_line(err)}); offline, point model.name at a "
            "local folder or use model.preset=tiny"
        ) from None


def load_processors(name: str) -> tuple[Any, Any]:
    """The tokenizer and image processor saved beside a model (hub id or folder)."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(name), CLIPImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the tokenizer / image processor of {name!r} ({_first_line(err)})"
        ) from None


def is_export(folder: str | Path) -> bool:
    """A trainer export (it has projection heads), as opposed to a plain CLIP folder or hub id."""
    return (Path(folder) / HEADS_CONFIG).is_file()


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
    """A CLIPModel plus image and text projection heads into one shared space and a learnable
    temperature. `forward` returns L2-normalised image and text embeddings (either may be None) and
    the logit scale. The temperature is shaped [1], not 0-dim: DeepSpeed 0.19.x mishandles 0-dim
    parameters (../shared/notes/stack-on-cpu.md); CLIP's own 0-dim logit_scale is frozen and only
    kept for export."""

    def __init__(self, clip: Any, spec: HeadSpec) -> None:
        super().__init__()
        self.clip = clip
        self.spec = spec
        self.image_head = ProjectionHead(spec)
        self.text_head = ProjectionHead(spec)
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone().reshape(1).float())
        clip.logit_scale.requires_grad_(False)

    @classmethod
    def around(cls, clip: Any) -> CLIPFineTuner:
        """A plain CLIP with identity heads: its own embeddings, through the same code."""
        d = clip.config.projection_dim
        return cls(clip, HeadSpec("linear", d, d, 0))

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
        self.clip.text_model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        for target in (folder, folder / "text_encoder", folder / "tokenizer"):
            tokenizer.save_pretrained(target)
        image_processor.save_pretrained(folder)
        save_file(self.heads_state(), str(folder / HEADS_FILE))
        (folder / HEADS_CONFIG).write_text(json.dumps({"heads": asdict(self.spec)}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPFineTuner:
        """Load a trainer export: the CLIPModel, then the heads and temperature."""
        folder = Path(folder)
        if not is_export(folder) or not (folder / HEADS_FILE).is_file():
            raise UserError(
                f"{folder}: not a trainer export (no {HEADS_CONFIG} / {HEADS_FILE}: an export without heads)"
            )
        spec = HeadSpec(**json.loads((folder / HEADS_CONFIG).read_text())["heads"])
        model = cls(load_clip(str(folder)), spec)
        state = load_file(str(folder / HEADS_FILE))
        for name, head in (("image_head.", model.image_head), ("text_head.", model.text_head)):
            head.load_state_dict({k[len(name) :]: v for k, v in state.items() if k.startswith(name)})
        with torch.no_grad():
            model.logit_scale.copy_(state["logit_scale"])
        return model.eval()


def text_length(source: str) -> int:
    """The longest caption the text tower of a CLIP (hub id or folder) takes: its position embeddings."""
    from transformers import CLIPConfig

    try:
        return int(CLIPConfig.from_pretrained(source).text_config.max_position_embeddings)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the CLIP config of {source!r} ({_first_line(err)})") from None


class Embedder:
    """Normalised image and text embeddings of a trainer export (through its heads) or of a plain CLIP
    folder, with the trainer's evaluation preprocessing and tokenisation."""

    @staticmethod
    def check(path: str) -> Path:
        """The folder, if it holds what an Embedder loads (cheap: for checks before anything heavy)."""
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"{path}: no such folder (expected a trainer export or a CLIP folder)")
        if not is_export(folder) and not (folder / "config.json").is_file():
            raise UserError(
                f"{path}: not a trainer export (no {HEADS_CONFIG}) nor a CLIP folder (no config.json)"
            )
        return folder

    def __init__(self, path: str, device: str) -> None:
        folder = self.check(path)
        self.model = (
            CLIPFineTuner.from_pretrained(folder)
            if is_export(folder)
            else CLIPFineTuner.around(load_clip(path))
        )
        self.model.to(device).eval()
        tokenizer, processor = load_processors(path)
        max_length = int(self.model.clip.config.text_config.max_position_embeddings)
        self.collate = Collate(tokenizer, max_length, False, processor)
        self.transform = ImageTransform.of(processor)
        self.device = device
        info = folder / "export.json"
        self.fingerprint = (
            json.loads(info.read_text())["content_sha256"]
            if info.is_file()
            else tree_digest(folder, "**/*.safetensors")
        )

    def pixels(self, pictures: list[Image.Image]) -> torch.Tensor:
        """The model's input for these pictures on its device (uint8 transform, then the batch
        normalisation there)."""
        fixed = random.Random(0)  # the evaluation transform draws nothing
        uint8 = torch.stack([self.transform(p, fixed) for p in pictures])
        return self.collate.normalise(uint8.to(self.device))

    @torch.no_grad()
    def images(self, pictures: list[Image.Image], chunk: int = 64) -> torch.Tensor:
        """Embeddings on the CPU, encoded `chunk` pictures at a time (any number fits the device)."""
        parts = [
            self.model.encode_image(self.pixels(pictures[i : i + chunk])).float().cpu()
            for i in range(0, len(pictures), chunk)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.model.projection_dim)

    @torch.no_grad()
    def texts(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        parts = []
        for i in range(0, len(texts), chunk):
            tokens = self.collate.tokenize(texts[i : i + chunk])
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            parts.append(self.model.encode_text(ids, mask).float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, self.model.projection_dim)

    def score(self, pictures: list[Image.Image], texts: list[str]) -> list[float]:
        """CLIPScore (Hessel et al. 2021): 100 × max(cos(image, text), 0), pairwise."""
        return (100 * (self.images(pictures) * self.texts(texts)).sum(-1).clamp(min=0)).tolist()

    def r_precision(self, pictures: list[Image.Image], prompts: list[str]) -> tuple[float, float]:
        """Of pictures drawn from prompts (picture i from prompts[i]): the mean CLIP score with their own
        prompt, and the CLIP R-precision: the fraction whose own prompt this CLIP ranks first among all
        the distinct prompts (Park et al. 2021's R-precision with R = 1)."""
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        distinct, own = list(index), torch.tensor([index[p] for p in prompts])
        image_emb, text_emb = self.images(pictures), self.texts(distinct)
        scores = 100 * (image_emb @ text_emb.t())[torch.arange(len(prompts)), own].clamp(min=0)
        return float(scores.mean()), float(ranked_first(image_emb, text_emb, own).float().mean())


def ranked_first(queries: torch.Tensor, candidates: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per query (normalised embeddings, a row each): whether candidate `own[i]` is the most similar of
    all candidates to query i. Its mean is R-precision with R = 1 (Park et al. 2021)."""
    return (queries @ candidates.t()).argmax(dim=1) == own
