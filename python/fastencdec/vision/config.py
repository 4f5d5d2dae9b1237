"""``VLMConfig``: a vision-language model = vision tower + projector + text model.

Fields the config does not define (``vocab_size``, ``pad_token_id``, ``d_model``,
``n_decoder_layers``...) are read from the text model's config, so code written for
a text model (the trainer, generation) reads a VLM's config the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..models import DecoderOnlyConfig, EncDecConfig
from .anyres import AnyResConfig
from .tower import VisionConfig

__all__ = ["VLMConfig", "VLM_ARCHITECTURES"]

VLM_ARCHITECTURES = {"encoder_decoder": "vlm_encoder_decoder",
                     "decoder_only": "vlm_decoder_only"}


@dataclass
class VLMConfig:
    text: EncDecConfig | DecoderOnlyConfig
    vision: VisionConfig
    anyres: AnyResConfig

    def __post_init__(self):
        if not isinstance(self.text, (EncDecConfig, DecoderOnlyConfig)):
            raise TypeError(f"text must be an EncDecConfig or a DecoderOnlyConfig, got "
                            f"{type(self.text).__name__}")
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"vision must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.anyres, AnyResConfig):
            raise TypeError(f"anyres must be an AnyResConfig, got {type(self.anyres).__name__}")
        if self.anyres.crop_size != self.vision.image_size:
            raise ValueError(f"anyres.crop_size ({self.anyres.crop_size}) must equal the "
                             f"tower's image_size ({self.vision.image_size})")

    def __getattr__(self, name):
        # only called for names the dataclass lacks: the text model's fields
        if name.startswith("__") or name in ("text", "vision", "anyres"):
            raise AttributeError(name)
        return getattr(self.text, name)

    @property
    def architecture(self) -> str:
        return VLM_ARCHITECTURES[self.text.architecture]

    @property
    def max_crops(self) -> int:
        """Most crops (base included) one image may bring."""
        return self.anyres.crops_limit

    @property
    def max_image_tokens(self) -> int:
        return self.max_crops * self.vision.tokens_per_crop

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "text": self.text.to_dict(),
                "vision": self.vision.to_dict(), "anyres": self.anyres.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> VLMConfig:
        data = dict(data)
        arch = data.pop("architecture", None)
        unknown = sorted(set(data) - {"text", "vision", "anyres"})
        if unknown:
            raise ValueError(f"unknown VLMConfig fields {unknown}")
        text = dict(data["text"])
        text_cls = {"encoder_decoder": EncDecConfig,
                    "decoder_only": DecoderOnlyConfig}.get(text.get("architecture"))
        if text_cls is None:
            raise ValueError(f"text config has unknown architecture {text.get('architecture')!r}")
        config = cls(text=text_cls.from_dict(text), vision=VisionConfig.from_dict(data["vision"]),
                     anyres=AnyResConfig.from_dict(data["anyres"]))
        if arch is not None and arch != config.architecture:
            raise ValueError(f"config says architecture {arch!r} but its text model is "
                             f"{config.text.architecture!r}")
        return config

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VLMConfig:
        """Read ``config.json``; errors name the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except KeyError as exc:
            raise ValueError(f"{path}: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
