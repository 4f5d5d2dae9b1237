"""Training: data alignment for distillation, trainer, checkpoints, evaluation, demo."""
from .activation_checkpointing import enable_activation_checkpointing  # noqa: F401
from .alignment import align_teacher_logits, build_student_decoder_inputs, build_teacher_inputs  # noqa: F401
from .checkpoint import (  # noqa: F401
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    atomic_torch_save,
    capture_rng_state,
    restore_rng_state,
)
from .checks import ConfigError  # noqa: F401
from .config import TrainConfig  # noqa: F401
from .distributed import DistInfo, init_distributed, unwrap_model, wrap_model  # noqa: F401
from .evaluation import Evaluator, exact_match_score, rouge_l, token_f1  # noqa: F401
from .interrupt import TrainingInterrupted  # noqa: F401
from .metrics import MetricsLogger, ProgressBar, read_metrics  # noqa: F401
from .objective import StudentLoss, TeacherHidden, sample_student_targets  # noqa: F401
from .optim import HybridOptimizer, build_optimizer, split_params  # noqa: F401
from .run_dir import OutputDirError  # noqa: F401
from .schedule import WarmupCosineSchedule, warmup_cosine_factor  # noqa: F401
from .teacher import teacher_logits_for, teacher_targets  # noqa: F401
from .trainer import Trainer  # noqa: F401
