"""The decoder-only baseline of the paper's comparisons (DESIGN §1): the same
pre-norm blocks (causal self-attention with RoPE + MLP), no cross-attention.

Padding may be on either side: positions count real tokens only
(``cumsum(mask) - 1``) and padded keys are masked, so a row's result does not
depend on its padding.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import generation, inputs
from . import decoder_prefill, decoder_step
from .config import DecoderOnlyConfig
from .layers import Block, RMSNorm, init_weights
from .outputs import IGNORE_INDEX, LMOutput, lm_loss
from .pretrained import PretrainedMixin


class DecoderOnlyLM(PretrainedMixin, nn.Module):
    """``forward`` for training/scoring, ``hidden_states`` for the final hidden states,
    ``generate`` (see :func:`fastencdec.generation.generate`)."""

    config_class = DecoderOnlyConfig
    is_encoder_decoder = False

    def __init__(self, config: DecoderOnlyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, causal=True) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, input_ids=None, attention_mask=None, *,
                      inputs_embeds=None) -> torch.Tensor:
        """Final hidden states ``[B, L, d]`` (after the final norm) of ``input_ids`` or
        ``inputs_embeds`` ``[B, L, d_model]``. Padded positions' states are meaningless."""
        x, mask = inputs.embedded("input_ids", input_ids, inputs_embeds, attention_mask,
                                  self.embed)
        return self._hidden(x, mask)

    def _hidden(self, x, mask):
        positions = None if mask is None else inputs.positions_from_mask(mask)
        for block in self.layers:
            x = block(x, key_padding_mask=mask, positions=positions)
        return self.norm(x)

    def forward(self, input_ids=None, attention_mask=None, labels=None, *,
                inputs_embeds=None) -> LMOutput:
        """Logits ``[B, L, vocab]``; with ``labels`` ``[B, L]`` the mean CE of predicting
        ``labels[:, t + 1]`` from position ``t`` (shifted here, as in most causal-LM
        code); -100 and padded positions are ignored."""
        x, mask = inputs.embedded("input_ids", input_ids, inputs_embeds, attention_mask,
                                  self.embed)
        if labels is not None:
            labels = inputs.labels("labels", labels, x.shape[:2], self.config.vocab_size)
        logits = self.lm_head(self._hidden(x, mask))
        loss = None
        if labels is not None:
            if mask is not None:
                labels = labels.masked_fill(~mask, IGNORE_INDEX)
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        return LMOutput(logits=logits, loss=loss)

    # -- cached decoding (used by generate) ----------------------------------------------
    def prefill(self, x, attention_mask, cache) -> torch.Tensor:
        """Run embedded prompts ``x`` ``[B, L, d]`` whose real tokens come first (right
        padding; ``attention_mask`` None = none), filling cache rows ``0..L-1`` (of ``n``
        copies per prompt when the cache holds ``n * B`` rows). Returns each prompt's
        next-token logits ``[B, vocab]`` (at its last real token)."""
        cache.record(x, start=0)
        states = decoder_prefill.run(self, x, attention_mask, cache)  # int8/bf16: one call
        if states is not None:
            x = states
        else:
            for i, block in enumerate(self.layers):
                x = block.prefill(x, attention_mask, cache, i)
        if attention_mask is None:
            last = x[:, -1]
        else:
            last_index = attention_mask.long().sum(1) - 1
            last = x[torch.arange(x.shape[0], device=x.device), last_index]
        return self.lm_head(self.norm(last))

    def decode_step(self, tokens, cache) -> torch.Tensor:
        """Feed ``tokens`` ``[R, T]`` at positions ``cache.lens[r] + t``; returns the last
        position's logits ``[R, vocab]``. Marks the step in the cache (``begin_step``);
        ``cache.lens`` is advanced by the caller."""
        cache.begin_step(tokens, self.config.pad_token_id)
        x = self.embed(tokens)
        cache.record(x)
        if cache.recomputing:  # dynamic NTK past the trained length: recompute everything
            x, mask = cache.replay()
            for block in self.layers:  # rows hold their tokens first: positions 0..len-1
                x = block(x, key_padding_mask=mask, rope_len=x.shape[1])
            last = (cache.lens_after.long() - 1)[:, None, None].expand(-1, 1, x.shape[2])
            return self.lm_head(self.norm(x.gather(1, last)[:, 0]))
        plan = None if torch.compiler.is_compiling() else decoder_step.step_plan(self)
        if plan is not None:  # int8/bf16: the whole step in one C++ call
            logits = decoder_step.run(plan, self, x, cache)
            if logits is not None:
                return logits
        for i, block in enumerate(self.layers):
            x = block.step(x, cache, i)
        return self.lm_head(self.norm(x[:, -1]))

    generate = generation.generate
