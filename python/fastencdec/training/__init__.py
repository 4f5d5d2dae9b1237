"""Training: data alignment for distillation, tokenizer, data, trainers."""
from .alignment import (align_teacher_logits, build_student_decoder_inputs,  # noqa: F401
                        build_teacher_inputs)
