"""The vision parts of the command line (``fastencdec demo --vision`` and
``fastencdec generate --image``), called from :mod:`fastencdec.cli`."""

from __future__ import annotations

import torch

__all__ = ["run_vision_demo_command", "generate_with_images"]


def run_vision_demo_command(args) -> int:
    from .demo import VisionDemoSettings, run_vision_demo

    settings = VisionDemoSettings.for_mode(
        quick=getattr(args, "quick", False), device=getattr(args, "device", None),
        out_dir=getattr(args, "out", None), seed=getattr(args, "seed", 0),
        steps=getattr(args, "steps", None), threads=getattr(args, "threads", None))
    result = run_vision_demo(settings)
    return 0 if result["ok"] else 1


def generate_with_images(args) -> int:
    """``--model`` a saved VLM, ``--image`` once (for every prompt) or once per ``--prompt``."""
    from ..data import format_qa_prompt, load_tokenizer
    from .models import load_vlm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts, images = list(args.prompt), list(args.image)
    if len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"--image given {len(images)} times for {len(prompts)} prompts: pass "
                         "one image for all prompts or one per --prompt")
    if getattr(args, "dtype", "fp32") not in (None, "fp32", "bf16"):
        raise ValueError(f"--dtype {args.dtype} is not supported for vision-language models "
                         "(fp32 or bf16)")
    model = load_vlm(args.model, device=device)
    if getattr(args, "dtype", "fp32") == "bf16":
        model = model.to(torch.bfloat16)
    if getattr(args, "threads", None) and device == "cpu":
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer or args.model)
    if getattr(args, "context", None) is not None:
        prompts = [format_qa_prompt(p, args.context) for p in prompts]
    batch = tok(prompts)
    out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         images=images, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_token_id=tok.eos_id)
    for text in tok.batch_decode(out.cpu()):
        print(text)
    return 0
