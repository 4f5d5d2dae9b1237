"""Size models to a parameter budget (DESIGN §1's split knob).

Widths (d_model, heads, d_ff, vocabulary, ...) come from a base configuration;
only layer counts are chosen. ``split=(2, 1)`` puts ≈2/3 of the transformer
layers' parameters in the encoder (the paper's best split); ``(1, 1)`` and
``(1, 2)`` give 1/2–1/2 and 1/3–2/3. Whole layers make the match approximate:
the result is checked against ``tolerance`` (relative, on the total count).
"""

from __future__ import annotations

import dataclasses
import math

from .config import DecoderOnlyConfig, EncDecConfig, _CommonConfig

# The layer-count search tries every encoder depth that fits the budget; beyond this
# many the request is not a model (and the search would take minutes), so it is refused.
MAX_SEARCH_LAYERS = 100_000


def _check_budget(n_params) -> int:
    if (isinstance(n_params, bool) or not isinstance(n_params, (int, float))
            or not math.isfinite(n_params) or n_params <= 0):
        raise ValueError(f"n_params must be a positive finite number, got {n_params!r}")
    return int(n_params)


def size_encdec_to_budget(
    n_params: int,
    split: tuple[float, float] = (2, 1),
    *,
    base: EncDecConfig | None = None,
    tolerance: float = 0.05,
    **overrides,
) -> EncDecConfig:
    """An :class:`EncDecConfig` of ≈``n_params`` parameters whose encoder holds
    ``split[0] / sum(split)`` of the transformer layers' parameters.

    ``base`` (default: the ``mu-330m`` preset) with ``overrides`` applied fixes the
    widths; the encoder/decoder layer counts minimise
    ``|total / n_params - 1| + |encoder share - target share|``.
    """
    n_params = _check_budget(n_params)
    if (not isinstance(split, (tuple, list)) or len(split) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                   or s <= 0 for s in split)):
        raise ValueError(f"split must be two positive numbers (encoder, decoder), got {split!r}")
    target_share = split[0] / (split[0] + split[1])
    cfg = (base or EncDecConfig.preset("mu-330m")).replace(**overrides)
    p_enc, p_dec = cfg.self_attention_layer_params(), cfg.decoder_layer_params()
    fixed = cfg.num_parameters() - cfg.encoder_params() - cfg.decoder_params()
    layer_budget = n_params - fixed
    if layer_budget < p_enc + p_dec:
        raise ValueError(
            f"n_params={n_params:,} is too small for these widths: embeddings and norms alone "
            f"take {fixed:,} and one encoder + one decoder layer {p_enc + p_dec:,}"
        )

    if layer_budget // p_enc > MAX_SEARCH_LAYERS:
        raise ValueError(
            f"n_params={n_params:,} would need more than {MAX_SEARCH_LAYERS:,} layers of these "
            f"widths (one encoder layer holds {p_enc:,} parameters); widen the model"
        )
    best = None
    for n_enc in range(1, layer_budget // p_enc + 2):
        # Candidate decoder depths: those that hit the total, and those that hit the share.
        by_total = (layer_budget - n_enc * p_enc) / p_dec
        by_share = n_enc * p_enc * (1 - target_share) / (target_share * p_dec)
        for guess in (by_total, by_share):
            for n_dec in {max(1, math.floor(guess)), max(1, math.ceil(guess))}:
                enc, dec = n_enc * p_enc, n_dec * p_dec
                cost = (abs((fixed + enc + dec) / n_params - 1)
                        + abs(enc / (enc + dec) - target_share))
                if best is None or cost < best[0]:
                    best = (cost, n_enc, n_dec)
    result = cfg.replace(n_encoder_layers=best[1], n_decoder_layers=best[2])
    _check_tolerance(result.num_parameters(), n_params, tolerance)
    return result


def size_decoder_only_to(
    target: int | EncDecConfig,
    *,
    base: DecoderOnlyConfig | None = None,
    tolerance: float | None = 0.05,
    **overrides,
) -> DecoderOnlyConfig:
    """A :class:`DecoderOnlyConfig` of ≈``target`` parameters.

    ``target`` is a parameter count (widths from ``base``, default the mu-330m widths,
    plus ``overrides``) or an :class:`EncDecConfig`: then its widths and its count are
    used (its twin) and the context doubles to hold input + output.
    ``tolerance=None`` returns the nearest whole-layer count unchecked (tiny models).
    """
    if isinstance(target, EncDecConfig):
        common = {f.name: getattr(target, f.name) for f in dataclasses.fields(_CommonConfig)}
        common["max_position_embeddings"] = 2 * target.max_position_embeddings
        cfg = DecoderOnlyConfig(**common).replace(**overrides)
        n_params = target.num_parameters()
    else:
        n_params = _check_budget(target)
        cfg = (base or DecoderOnlyConfig()).replace(**overrides)
    per_layer = cfg.self_attention_layer_params()
    fixed = cfg.num_parameters() - cfg.n_layers * per_layer
    n_layers = max(1, round((n_params - fixed) / per_layer))
    if n_layers > MAX_SEARCH_LAYERS:
        raise ValueError(f"{n_params:,} parameters would need {n_layers:,} layers of these "
                         f"widths (more than {MAX_SEARCH_LAYERS:,}); widen the model")
    result = cfg.replace(n_layers=n_layers)
    _check_tolerance(result.num_parameters(), n_params, tolerance)
    return result


def _check_tolerance(got: int, wanted: int, tolerance: float | None) -> None:
    if tolerance is not None and abs(got / wanted - 1) > tolerance:
        raise ValueError(
            f"whole layers of these widths give {got:,} parameters, {abs(got / wanted - 1):.1%} "
            f"from the requested {wanted:,} (tolerance {tolerance:.0%}); change the widths"
        )


__all__ = ["size_encdec_to_budget", "size_decoder_only_to"]
