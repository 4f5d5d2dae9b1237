"""The encoder-decoder LM of "Return of the Encoder" (arXiv 2501.16273; DESIGN §1).

The encoder reads the input once with bidirectional self-attention (RoPE, key
padding mask). The decoder runs causal self-attention (RoPE), cross-attention
(no RoPE) to the final encoder states, and an MLP. Pre-norm blocks, RMSNorm,
input and output embeddings tied.

Encoder RoPE positions count real tokens (``cumsum(mask) - 1``), so padding
anywhere (left, right or inside) leaves the real tokens' outputs unchanged. With
dynamic NTK scaling the encoder's base is taken at its padded length, as the
reference model does.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import generation, inputs
from . import decoder_step, encoder_pass
from .config import EncDecConfig
from .layers import Block, DecoderBlock, RMSNorm, init_weights
from .outputs import IGNORE_INDEX, LMOutput, lm_loss
from .pretrained import PretrainedMixin


class EncoderDecoderLM(PretrainedMixin, nn.Module):
    """``forward`` for training/scoring, ``encode``/``decode`` for the pieces,
    ``generate`` (see :func:`fastencdec.generation.generate`)."""

    config_class = EncDecConfig
    is_encoder_decoder = True
    # int8/bf16 inference models: the one-call encoder's attention products on bf16
    # operands ("bf16") or in fp32 as the module path ("fp32"); see models/encoder_pass.py
    encoder_attention = "bf16"

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.ModuleList(Block(config, causal=False)
                                     for _ in range(config.n_encoder_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # -- the paper's model ---------------------------------------------------------------
    def encode(self, input_ids=None, attention_mask=None, *, inputs_embeds=None) -> torch.Tensor:
        """Final encoder states ``[B, Lx, d]`` (after the encoder's final norm), from
        ``input_ids`` ``[B, Lx]`` or ``inputs_embeds`` ``[B, Lx, d_model]`` (e.g. image
        tokens followed by text). ``attention_mask``: True/1 = real token; None = no
        padding."""
        x, mask = inputs.embedded("input_ids", input_ids, inputs_embeds, attention_mask,
                                  self.embed)
        return self._encode(x, mask)

    def decode(self, decoder_input_ids, encoder_states, attention_mask=None,
               decoder_attention_mask=None) -> torch.Tensor:
        """Final decoder hidden states ``[B, T, d]`` (after the final norm; logits are
        ``lm_head`` of them; ``fastencdec.ops.distill_loss`` takes them with
        ``lm_head.weight``). ``decoder_input_ids`` start with BOS and are right-padded;
        ``attention_mask`` is the encoder's (bool)."""
        ids = inputs.token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size)
        dmask = inputs.attention_mask("decoder_attention_mask", decoder_attention_mask, ids)
        inputs.same_batch("decoder_input_ids", ids, encoder_states.shape[0])
        if attention_mask is not None:
            attention_mask = inputs.attention_mask(
                "attention_mask", attention_mask, encoder_states[..., 0])
        return self._decode(ids, encoder_states, attention_mask, dmask)

    def _encode(self, x, mask):
        states = encoder_pass.run(self, x, mask)  # int8/bf16: the encoder in one C++ call
        if states is not None:
            return states
        positions = None if mask is None else inputs.positions_from_mask(mask)
        # dynamic NTK: the base at the padded length, like the reference model
        rope_len = x.shape[1] if self.config.rope_scaling_factor > 1.0 else None
        for block in self.encoder:
            x = block(x, key_padding_mask=mask, positions=positions, rope_len=rope_len)
        return self.encoder_norm(x)

    def _decode(self, ids, encoder_states, encoder_mask, decoder_mask):
        x = self.embed(ids)
        for block in self.decoder:
            x = block(x, encoder_states, encoder_mask=encoder_mask, decoder_mask=decoder_mask)
        return self.decoder_norm(x)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, *, inputs_embeds=None) -> LMOutput:
        """Logits ``[B, T, vocab]`` for the decoder positions; with ``labels`` ``[B, T]``
        (position ``t``'s target, -100 = ignore) also the mean CE. Without
        ``decoder_input_ids`` the decoder reads ``[BOS] + labels[:, :-1]``. Positions
        where ``decoder_attention_mask`` is False never count in the loss. The encoder
        reads ``input_ids`` or ``inputs_embeds``."""
        vocab = self.config.vocab_size
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(inputs.labels("labels", labels, None, vocab))
        x, mask = inputs.embedded("input_ids", input_ids, inputs_embeds, attention_mask,
                                  self.embed)
        dec_ids = inputs.token_ids("decoder_input_ids", decoder_input_ids, vocab)
        dmask = inputs.attention_mask("decoder_attention_mask", decoder_attention_mask, dec_ids)
        inputs.same_batch("decoder_input_ids", dec_ids, x.shape[0])
        if labels is not None:
            labels = inputs.labels("labels", labels, dec_ids.shape, vocab)
        hidden = self._decode(dec_ids, self._encode(x, mask), mask, dmask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if dmask is not None:
                labels = labels.masked_fill(~dmask, IGNORE_INDEX)
            loss = lm_loss(logits, labels)
        return LMOutput(logits=logits, loss=loss)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """``[BOS] + labels[:, :-1]`` with ignored (-100) labels read as PAD."""
        start = labels.new_full((labels.shape[0], 1), self.config.bos_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    # -- cached decoding (used by generate) ----------------------------------------------
    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention K/V ``[B, Lx, Hkv, D]``, projected once."""
        return [block.cross_attn.project_kv(encoder_states) for block in self.decoder]

    def decode_step(self, tokens, cache, cross_kv, encoder_mask=None) -> torch.Tensor:
        """Feed ``tokens`` ``[R, T]`` (``R = n * B`` rows, row ``b * n + i`` reading input
        ``b``) through the decoder with the static self-attention ``cache``; returns the
        last position's logits ``[R, vocab]``. Marks the step in the cache
        (``begin_step``); ``cache.lens`` is advanced by the caller, and ``cache.total_len``
        set to the length after this step (it decides recomputation under dynamic NTK)."""
        cache.begin_step(tokens, self.config.pad_token_id)
        x = self.embed(tokens)
        cache.record(x)
        if cache.recomputing:  # dynamic NTK past the trained length: as the reference does
            return self._decode_everything(cache, cross_kv, encoder_mask)
        plan = None if torch.compiler.is_compiling() else decoder_step.step_plan(self)
        if plan is not None:  # int8/bf16: the whole step in one C++ call
            logits = decoder_step.run(plan, self, x, cache, cross_kv, encoder_mask)
            if logits is not None:
                return logits
        for i, block in enumerate(self.decoder):
            cross_k, cross_v = cross_kv[i]
            x = block.step(x, cache, i, cross_k, cross_v, encoder_mask)
        return self.lm_head(self.decoder_norm(x[:, -1]))

    def _decode_everything(self, cache, cross_kv, encoder_mask):
        """The decoder over every token fed so far (the RoPE base of the current length);
        returns each row's last logits."""
        x, mask = cache.replay()
        for block, kv in zip(self.decoder, cross_kv, strict=True):
            x = block(x, None, encoder_mask=encoder_mask, decoder_mask=mask, cross_kv=kv,
                      rope_len=x.shape[1])
        last = (cache.lens_after.long() - 1)[:, None, None].expand(-1, 1, x.shape[2])
        return self.lm_head(self.decoder_norm(x.gather(1, last)[:, 0]))

    generate = generation.generate
