"""kronfluence-bif: local Bayesian influence functions as a drop-in kronfluence strategy."""

from kronfluence import FactorArguments, ScoreArguments, Task

from kronfluence_bif.analyzer import STRATEGIES, Analyzer
from kronfluence_bif.arguments import BIFArguments
from kronfluence_bif.calibrate import CalibrationResult, calibrate
from kronfluence_bif.errors import SamplerDivergenceError, TaskContractError
from kronfluence_bif.task import BIFTask
from kronfluence_bif.tasks import CausalLMTask, ClassificationTask, RegressionTask
from kronfluence_bif.tracking import prepare_model

__version__ = "0.1.0"

__all__ = [
    "Analyzer",
    "BIFArguments",
    "BIFTask",
    "CausalLMTask",
    "CalibrationResult",
    "ClassificationTask",
    "FactorArguments",
    "RegressionTask",
    "STRATEGIES",
    "SamplerDivergenceError",
    "ScoreArguments",
    "Task",
    "TaskContractError",
    "__version__",
    "calibrate",
    "prepare_model",
]
