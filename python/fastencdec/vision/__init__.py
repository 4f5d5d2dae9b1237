"""Images in: loading, any-resolution crops with variance selection, a CLIP-style
vision tower, the projector and vision-language models for both architectures.

=================  ====================================================================
``image_io``       ``load_image``: EXIF, modes -> RGB, one-line ``ImageError`` per bad file
``anyres``         resolution choice, resize + pad, crops, base crop, normalisation
``selection``      grayscale std per crop, top-k selection
``tower``          ``VisionTower`` / ``VisionConfig`` (presets ``clip-vit-l-336``, ``tiny``)
``projector``      ``mlp2x_gelu``
``hf_clip``        load a local Hugging Face CLIP (vision) checkpoint folder
``models``         ``EncoderDecoderVLM``, ``DecoderOnlyVLM``, ``load_vlm``
``data``           image + text JSONL, ``ImageTextCollator``
``synthetic``      the demo's visual QA images
``demo``           ``fastencdec demo --vision``
=================  ====================================================================
"""

from .anyres import AnyResConfig, process_image
from .config import VLMConfig
from .hf_clip import load_hf_clip_vision
from .image_io import ImageError, load_image
from .models import DecoderOnlyVLM, EncoderDecoderVLM, load_vlm
from .projector import Projector
from .tower import VisionConfig, VisionTower

__all__ = ["AnyResConfig", "process_image", "VLMConfig", "load_hf_clip_vision", "ImageError",
           "load_image", "DecoderOnlyVLM", "EncoderDecoderVLM", "load_vlm", "Projector",
           "VisionConfig", "VisionTower"]
