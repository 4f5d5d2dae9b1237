"""Vision-language models (LLaVA-style) for both architectures.

Each image becomes crops (:mod:`.anyres`), each crop ``tokens_per_crop`` patch
features (:class:`VisionTower`), projected to ``d_model`` (:class:`Projector`).

- :class:`EncoderDecoderVLM`: the encoder reads ``[image tokens] + [embedded
  prompt]``; the decoder generates the answer with cross-attention to all of it
  (cross K/V computed once per input by ``generate``).
- :class:`DecoderOnlyVLM`: the same image tokens are prepended to the prompt.

Batches: ``image_pixels`` ``[B, C, 3, S, S]`` with ``image_crop_mask`` ``[B, C]``
(True = a real crop, real crops first; rows may have different numbers of crops,
or none). A row's image tokens are its real crops' tokens in order (base crop
first, patches row by row).

Two ways to pass a prompt with an image:

- ``input_ids`` hold the prompt only; the model puts the image tokens before it
  (``generate`` and interactive use);
- ``image_slots=True``: each row of ``input_ids`` already starts (at its first real
  token) with ``n_img`` placeholder tokens (any id, masked as real), and the image
  tokens replace their embeddings. Batches made by
  :class:`~fastencdec.vision.data.ImageTextCollator` look like this, so training code
  written for text models (the ``Trainer``, which hands every ``image*`` batch entry
  to ``encode`` / ``hidden_states``) keeps working: the prompt mask is the encoder's
  mask, and a decoder-only model's left padding moves the slots with the prompt.

RoPE positions: a row's image tokens take positions ``0 .. n_img - 1`` and its
prompt tokens follow at ``n_img ..`` (padding, crop padding included, takes none).
The encoder-decoder packs each row's real tokens to the front, so its encoder
sees exactly these positions; the decoder-only model derives positions from the
mask (``cumsum - 1``), which gives the same numbers. Hence a row's result never
depends on the other rows of its batch. In the encoder only relative positions
matter anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..inputs import embedding_like
from ..models import DecoderOnlyLM, EncoderDecoderLM, LMOutput
from ..models.meta_init import on_meta
from .anyres import ProcessedImage, process_image, stack_images
from .config import VLMConfig
from .projector import Projector
from .tower import VisionTower

__all__ = ["EncoderDecoderVLM", "DecoderOnlyVLM", "load_vlm", "pack_left"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PARTS = ("vision", "projector", "lm")
IGNORE_INDEX = -100
_INT = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# -- argument checks (clear errors naming the argument) -------------------------------------
def _token_ids(name: str, ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT:
        raise TypeError(f"{name} must be an integer torch.Tensor [batch, seq]")
    if ids.dim() != 2 or 0 in ids.shape:
        raise ValueError(f"{name} must be 2-D [batch, seq] and non-empty, got {list(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} values must lie in [0, vocab_size={vocab_size}), "
                         f"got [{lo}, {hi}]")
    return ids.long()


def _mask(name: str, mask, shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or (mask.dtype != torch.bool and mask.dtype not in _INT):
        raise TypeError(f"{name} must be a bool (or 0/1 integer) torch.Tensor")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask.bool()


def _labels(name: str, labels, shape, vocab_size: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT:
        raise TypeError(f"{name} must be an integer torch.Tensor")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(labels.shape)}")
    if labels.dim() != 2 or 0 in labels.shape:
        raise ValueError(f"{name} must be 2-D [batch, seq], got {list(labels.shape)}")
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(f"{name} values must lie in [0, vocab_size={vocab_size}) or be "
                         f"{IGNORE_INDEX}")
    return labels.long()


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labels != -100, in fp32 (0 when every label is ignored)."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return losses / (labels != IGNORE_INDEX).sum().clamp(min=1)


def pack_left(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (``mask`` True) to the front, keeping their order,
    and drop the columns no row needs. Returns ``(embeds [B, n, d], mask [B, n])``
    with ``n`` the most real tokens of any row."""
    lens = mask.sum(1)
    if bool((lens == 0).any()):
        row = int((lens == 0).nonzero()[0])
        raise ValueError(f"row {row} has neither image crops nor prompt tokens")
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    n = int(lens.max())
    index = order[:, :n]
    packed = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return packed, torch.arange(n, device=mask.device)[None, :] < lens[:, None]


class _VisionLanguageModel(nn.Module):
    """Vision tower + projector + text model ``lm``; shared input handling."""

    text_class: type

    def __init__(self, config: VLMConfig):
        super().__init__()
        if not isinstance(config, VLMConfig):
            raise TypeError(f"config must be a VLMConfig, got {type(config).__name__}")
        if not isinstance(config.text, self.text_class.config_class):
            raise TypeError(f"{type(self).__name__} needs a "
                            f"{self.text_class.config_class.__name__} text config")
        self.config = config
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config.vision.width, config.text.d_model)
        self.lm = self.text_class(config.text)

    # what generic training / generation code reads from a text model
    @property
    def embed(self) -> nn.Embedding:
        return self.lm.embed

    @property
    def lm_head(self) -> nn.Linear:
        return self.lm.lm_head

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -- training stages ------------------------------------------------------------------
    def set_trainable(self, *, vision: bool, projector: bool, lm: bool):
        """Freeze / unfreeze each part (stage 1 of the reference recipe trains the
        projector only; stage 2 the projector and the language model)."""
        for part, on in (("vision", vision), ("projector", projector), ("lm", lm)):
            getattr(self, part).requires_grad_(bool(on))
        return self

    def trainable_parts(self) -> list[str]:
        return [p for p in PARTS if any(q.requires_grad for q in getattr(self, p).parameters())]

    # -- images ---------------------------------------------------------------------------
    def preprocess(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: one entry per row, a path, a ``PIL.Image``, a
        :class:`ProcessedImage` or None (no image). Returns ``(image_pixels,
        image_crop_mask)`` on the model's device."""
        if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__len__"):
            raise TypeError("images must be a list with one entry per row (path, PIL.Image, "
                            "ProcessedImage or None)")
        pixels = []
        for image in images:
            if image is None:
                pixels.append(None)
                continue
            done = image if isinstance(image, ProcessedImage) else process_image(
                image, self.config.anyres)
            pixels.append(done.pixels(self.config.anyres))
        px, mask = stack_images(pixels)
        weight = embedding_like(self.embed)
        return px.to(device=weight.device, dtype=self.vision.embeddings.patch_embedding.weight
                     .dtype), mask.to(weight.device)

    def _check_images(self, image_pixels, image_crop_mask, batch: int | None):
        cfg = self.config
        size = cfg.vision.image_size
        if not isinstance(image_pixels, torch.Tensor) or not image_pixels.is_floating_point():
            raise TypeError("image_pixels must be a floating-point torch.Tensor "
                            f"[batch, crops, 3, {size}, {size}]")
        if image_pixels.dim() != 5 or tuple(image_pixels.shape[2:]) != (3, size, size):
            raise ValueError(f"image_pixels must have shape [batch, crops, 3, {size}, {size}], "
                             f"got {list(image_pixels.shape)}")
        if batch is not None and image_pixels.shape[0] != batch:
            raise ValueError(f"image_pixels has batch {image_pixels.shape[0]} but the prompt "
                             f"has {batch}")
        if image_crop_mask is None:
            image_crop_mask = torch.ones(image_pixels.shape[:2], dtype=torch.bool,
                                         device=image_pixels.device)
        mask = _mask("image_crop_mask", image_crop_mask, image_pixels.shape[:2],
                     image_pixels.device)
        if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError("image_crop_mask: each row's real crops must come first "
                             "(True before False)")
        counts = mask.sum(1)
        if mask.numel() and int(counts.max()) > cfg.max_crops:
            row = int((counts > cfg.max_crops).nonzero()[0])
            raise ValueError(f"image_crop_mask row {row} has {int(counts[row])} crops, more "
                             f"than the model's max_crops={cfg.max_crops}")
        return mask

    def image_embeddings(self, image_pixels, image_crop_mask=None, *, batch: int | None = None):
        """Projected image tokens ``[B, C * P, d_model]`` and their mask ``[B, C * P]``
        (``P`` tokens per crop; padded crops are zeros and masked). Only real crops run
        through the tower."""
        mask = self._check_images(image_pixels, image_crop_mask, batch)
        b, c = mask.shape
        p, d = self.config.vision.tokens_per_crop, self.config.text.d_model
        out_dtype = embedding_like(self.embed).dtype
        tokens = torch.zeros(b, c, p, d, dtype=out_dtype, device=image_pixels.device)
        if bool(mask.any()):
            feats = self.projector(self.vision(image_pixels[mask]))
            tokens = tokens.index_put((mask,), feats.to(out_dtype))
        return tokens.reshape(b, c * p, d), mask.repeat_interleave(p, dim=1)

    def _text(self, input_ids, attention_mask):
        ids = _token_ids("input_ids", input_ids, self.config.text.vocab_size)
        mask = _mask("attention_mask", attention_mask, ids.shape, ids.device)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        return self.embed(ids), mask

    def _slotted(self, input_ids, attention_mask, image_pixels, image_crop_mask, images):
        """Prompt embeddings ``[B, L, d]`` whose first ``n_img`` real positions per row
        hold the row's image tokens, and the prompt mask (``image_slots=True``)."""
        if input_ids is None:
            raise ValueError("image_slots=True needs input_ids holding the image slots")
        if images is not None:
            if image_pixels is not None:
                raise ValueError("pass either images or image_pixels, not both")
            image_pixels, image_crop_mask = self.preprocess(images)
        text, mask = self._text(input_ids, attention_mask)
        if image_pixels is None:
            return text, mask
        img, img_mask = self.image_embeddings(image_pixels, image_crop_mask, batch=text.shape[0])
        n_img, n_real = img_mask.sum(1), mask.sum(1)
        short = (n_real < n_img).nonzero()
        if short.numel():
            r = int(short[0])
            raise ValueError(f"input_ids row {r} has {int(n_real[r])} real tokens, fewer than "
                             f"its {int(n_img[r])} image slots (image_slots=True)")
        rank = mask.long().cumsum(1) - 1  # index among the row's real tokens
        slot = mask & (rank < n_img[:, None])
        if not bool(slot.any()):
            return text, mask
        # real crops come first (checked), so a row's image tokens are img[b, :n_img[b]]
        index = rank.clamp(0, img.shape[1] - 1)
        filled = img.gather(1, index[..., None].expand(-1, -1, img.shape[-1]))
        return torch.where(slot[..., None], filled, text), mask

    def _parts(self, input_ids, attention_mask, image_pixels, image_crop_mask, images):
        """[image tokens, prompt tokens] embeddings and masks (not packed)."""
        if images is not None:
            if image_pixels is not None:
                raise ValueError("pass either images or image_pixels, not both")
            image_pixels, image_crop_mask = self.preprocess(images)
        embeds, masks = [], []
        batch = None
        if input_ids is not None:
            text, text_mask = self._text(input_ids, attention_mask)
            batch = text.shape[0]
        elif attention_mask is not None:
            raise ValueError("attention_mask given without input_ids")
        if image_pixels is not None:
            img, img_mask = self.image_embeddings(image_pixels, image_crop_mask, batch=batch)
            embeds.append(img)
            masks.append(img_mask)
        elif image_crop_mask is not None:
            raise ValueError("image_crop_mask given without image_pixels")
        if input_ids is not None:
            embeds.append(text)
            masks.append(text_mask)
        if not embeds:
            raise ValueError("nothing to read: pass input_ids and/or images / image_pixels")
        return embeds, masks

    # -- saving ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors`` (a tied LM head stored once), each
        written to a temporary file and renamed into place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = {"lm.lm_head.weight"} if self.config.text.tie_embeddings else set()
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                   if k not in tied}
        tmp = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, directory / WEIGHTS_NAME)
        self.config.save(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None):
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (not a saved model?)")
        config = VLMConfig.load(directory / CONFIG_NAME)
        if cls is not _VisionLanguageModel and config.text.architecture != \
                cls.text_class.config_class.architecture:
            raise ValueError(f"{directory} holds a {config.architecture} model, not a "
                             f"{cls.__name__}")
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device or "cpu"))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with on_meta():
            model = cls(config)
        result = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in result.missing_keys
                   if not (k == "lm.lm_head.weight" and config.text.tie_embeddings)]
        if missing or result.unexpected_keys:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match the model: missing "
                             f"{missing[:6]}, unexpected {result.unexpected_keys[:6]}")
        model.lm.tie_weights()
        return model.eval()


class EncoderDecoderVLM(_VisionLanguageModel):
    """Image tokens + prompt in the encoder, the answer from the decoder.

    ``encode`` / ``decode`` / ``forward`` take the text model's arguments plus
    ``image_pixels`` / ``image_crop_mask``. The encoder states cover image and prompt
    tokens packed per row: ``decode`` needs *their* mask, which
    :meth:`encoder_attention_mask` (or :meth:`encode_with_mask`) gives.
    """

    text_class = EncoderDecoderLM

    def encoder_inputs(self, input_ids=None, attention_mask=None, *, image_pixels=None,
                       image_crop_mask=None, images=None, image_slots: bool = False):
        """Encoder input embeddings ``[B, N, d]`` and mask ``[B, N]``: packed image +
        prompt tokens, or (``image_slots``) the prompt with its slots filled."""
        if image_slots:
            return self._slotted(input_ids, attention_mask, image_pixels, image_crop_mask,
                                 images)
        embeds, masks = self._parts(input_ids, attention_mask, image_pixels, image_crop_mask,
                                    images)
        return pack_left(torch.cat(embeds, 1), torch.cat(masks, 1))

    def encode_with_mask(self, input_ids=None, attention_mask=None, *, image_pixels=None,
                         image_crop_mask=None, images=None, image_slots: bool = False):
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, image_pixels=image_pixels,
                                           image_crop_mask=image_crop_mask, images=images,
                                           image_slots=image_slots)
        return self.lm.encode(inputs_embeds=embeds, attention_mask=mask), mask

    def encode(self, input_ids=None, attention_mask=None, *, image_pixels=None,
               image_crop_mask=None, images=None, image_slots: bool = False) -> torch.Tensor:
        """Final encoder states ``[B, N, d]`` of the image + prompt tokens (with
        ``image_slots``, ``N`` = the prompt's length and its mask is the prompt's)."""
        return self.encode_with_mask(input_ids, attention_mask, image_pixels=image_pixels,
                                     image_crop_mask=image_crop_mask, images=images,
                                     image_slots=image_slots)[0]

    def encoder_attention_mask(self, attention_mask=None, *, input_ids=None, image_pixels=None,
                               image_crop_mask=None) -> torch.Tensor:
        """The mask of :meth:`encode`'s output, from the prompt mask and the crop mask
        (no tower run). With no prompt mask, ``input_ids``' shape says every token is real."""
        counts = []
        if image_pixels is not None:
            crops = self._check_images(image_pixels, image_crop_mask, None)
            counts.append(crops.sum(1) * self.config.vision.tokens_per_crop)
        if attention_mask is not None:
            counts.append(attention_mask.bool().sum(1))
        elif input_ids is not None:
            counts.append(torch.full((input_ids.shape[0],), input_ids.shape[1],
                                     device=input_ids.device))
        if not counts:
            raise ValueError("encoder_attention_mask needs a prompt mask, input_ids or images")
        lens = sum(counts)
        n = int(lens.max())
        return torch.arange(n, device=lens.device)[None, :] < lens[:, None]

    def decode(self, decoder_input_ids, encoder_states, attention_mask=None,
               decoder_attention_mask=None) -> torch.Tensor:
        """The text model's ``decode``; ``attention_mask`` is the encoder states' mask
        ``[B, N]`` (from :meth:`encoder_attention_mask`), not the prompt's."""
        if attention_mask is not None and attention_mask.shape[-1] != encoder_states.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the encoder "
                f"states have {encoder_states.shape[1]} (image + prompt tokens): pass "
                "model.encoder_attention_mask(prompt_mask, image_pixels=..., "
                "image_crop_mask=...)")
        return self.lm.decode(decoder_input_ids, encoder_states, attention_mask,
                              decoder_attention_mask)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, *, image_pixels=None,
                image_crop_mask=None, images=None, image_slots: bool = False) -> LMOutput:
        """Decoder logits ``[B, T, vocab]`` (and the mean CE with ``labels``), as
        ``EncoderDecoderLM.forward`` with the image in the encoder."""
        text = self.config.text
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.lm.shift_right(_labels("labels", labels, None,
                                                            text.vocab_size))
        states, mask = self.encode_with_mask(input_ids, attention_mask, image_pixels=image_pixels,
                                             image_crop_mask=image_crop_mask, images=images,
                                             image_slots=image_slots)
        dec_ids = _token_ids("decoder_input_ids", decoder_input_ids, text.vocab_size)
        dmask = _mask("decoder_attention_mask", decoder_attention_mask, dec_ids.shape,
                      dec_ids.device)
        logits = self.lm_head(self.lm.decode(dec_ids, states, mask, dmask))
        loss = None
        if labels is not None:
            labels = _labels("labels", labels, dec_ids.shape, text.vocab_size)
            if dmask is not None:
                labels = labels.masked_fill(~dmask, IGNORE_INDEX)
            loss = _lm_loss(logits, labels)
        return LMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, *, images=None, image_pixels=None,
                 image_crop_mask=None, image_slots: bool = False, **kwargs) -> torch.Tensor:
        """``EncoderDecoderLM.generate`` (same keyword arguments and result) with the
        image tokens in the encoder: they are encoded once and the cross K/V of every
        decoder layer computed once from image + prompt states."""
        was_training = self.training
        self.eval()
        try:
            embeds, mask = self.encoder_inputs(input_ids, attention_mask,
                                               image_pixels=image_pixels,
                                               image_crop_mask=image_crop_mask, images=images,
                                               image_slots=image_slots)
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        finally:
            self.train(was_training)


class DecoderOnlyVLM(_VisionLanguageModel):
    """LLaVA: image tokens prepended to the prompt of a decoder-only model.

    ``hidden_states`` / ``forward`` return results for the prompt positions only
    (aligned with ``input_ids``), so training code written for the text model works
    unchanged; the image positions' states are computed but not returned.
    """

    text_class = DecoderOnlyLM

    def _run(self, input_ids, attention_mask, image_pixels, image_crop_mask, images,
             image_slots=False):
        if image_slots:
            embeds, mask = self._slotted(input_ids, attention_mask, image_pixels,
                                         image_crop_mask, images)
            return self.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask)
        embeds, masks = self._parts(input_ids, attention_mask, image_pixels, image_crop_mask,
                                    images)
        n_image = embeds[0].shape[1] if len(embeds) == 2 or input_ids is None else 0
        mask = torch.cat(masks, 1)
        if bool((mask.sum(1) == 0).any()):
            row = int((mask.sum(1) == 0).nonzero()[0])
            raise ValueError(f"row {row} has neither image crops nor prompt tokens")
        hidden = self.lm.hidden_states(inputs_embeds=torch.cat(embeds, 1), attention_mask=mask)
        return hidden[:, n_image:] if input_ids is not None else hidden

    def hidden_states(self, input_ids=None, attention_mask=None, *, image_pixels=None,
                      image_crop_mask=None, images=None, image_slots: bool = False
                      ) -> torch.Tensor:
        """Final hidden states ``[B, L, d]`` at the prompt positions (``input_ids``' shape),
        each having read the row's image tokens first. Padding on either side."""
        return self._run(input_ids, attention_mask, image_pixels, image_crop_mask, images,
                         image_slots)

    def forward(self, input_ids=None, attention_mask=None, labels=None, *, image_pixels=None,
                image_crop_mask=None, images=None, image_slots: bool = False) -> LMOutput:
        """Logits ``[B, L, vocab]`` at the prompt positions; with ``labels`` the mean CE of
        predicting ``labels[:, t + 1]`` from position ``t``, as ``DecoderOnlyLM.forward``."""
        text = self.config.text
        hidden = self._run(input_ids, attention_mask, image_pixels, image_crop_mask, images,
                           image_slots)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if input_ids is None:
                raise ValueError("labels need input_ids")
            labels = _labels("labels", labels, input_ids.shape, text.vocab_size)
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
            loss = _lm_loss(logits[:, :-1], labels[:, 1:])
        return LMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, *, images=None, image_pixels=None,
                 image_crop_mask=None, image_slots: bool = False, **kwargs) -> torch.Tensor:
        """``DecoderOnlyLM.generate`` with the image tokens before the prompt: the
        cache is prefilled with image + prompt, then decoding proceeds as for text."""
        was_training = self.training
        self.eval()
        try:
            if image_slots:
                embeds, mask = self._slotted(input_ids, attention_mask, image_pixels,
                                             image_crop_mask, images)
                return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            embeds, masks = self._parts(input_ids, attention_mask, image_pixels,
                                        image_crop_mask, images)
            return self.lm.generate(inputs_embeds=torch.cat(embeds, 1),
                                    attention_mask=torch.cat(masks, 1), **kwargs)
        finally:
            self.train(was_training)


def load_vlm(directory: str | os.PathLike, *, device=None, dtype=None):
    """An :class:`EncoderDecoderVLM` or :class:`DecoderOnlyVLM` saved with ``save_pretrained``."""
    config = VLMConfig.load(Path(directory) / CONFIG_NAME)
    cls = EncoderDecoderVLM if config.text.architecture == "encoder_decoder" else DecoderOnlyVLM
    return cls.from_pretrained(directory, device=device, dtype=dtype)
