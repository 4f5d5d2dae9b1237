"""Images in: loading, any-resolution crops with variance selection, a CLIP-style
vision tower, the projector and vision-language models for both architectures."""
