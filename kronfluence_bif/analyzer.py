"""`Analyzer`: kronfluence's Analyzer with one more strategy, "bif"."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Optional, Sequence

from kronfluence.analyzer import Analyzer as KronfluenceAnalyzer
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.exceptions import FactorsNotFoundError
from torch import nn
from torch.utils import data

from kronfluence_bif import storage
from kronfluence_bif.arguments import RUN_CONTROL_FIELDS, BIFArguments
from kronfluence_bif.distributed import process_state
from kronfluence_bif.logs import logger, set_main_process_only
from kronfluence_bif.requests import ScoreRequest
from kronfluence_bif.scoring import BIFScorer
from kronfluence_bif.storage import ScoreKind
from kronfluence_bif.tracking import tracked_module_names, untracked_error, untracked_model_allowed

KRONFLUENCE_STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
STRATEGIES = KRONFLUENCE_STRATEGIES + ("bif",)


def check_strategy(strategy: Optional[str], where: str) -> None:
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r} in {where}. Valid strategies: {list(STRATEGIES)}.")


class Analyzer(KronfluenceAnalyzer):
    """kronfluence's `Analyzer`, plus `strategy="bif"`: local Bayesian influence scores from one SGLD phase.

    `strategy` and `bif_args` set the defaults of later fits; each fit records its strategy (and, for BIF,
    its sampler settings) in `factors_<name>/`, and `compute_*_scores` uses what the named factors recorded.
    Every kronfluence strategy behaves exactly as in kronfluence.
    """

    def __init__(
        self,
        analysis_name: str,
        model: nn.Module,
        task: Task,
        cpu: bool = False,
        log_level: Optional[int] = None,
        log_main_process_only: bool = True,
        profile: bool = False,
        disable_tqdm: bool = False,
        output_dir: str = "./influence_results",
        disable_model_save: bool = True,
        strategy: Optional[str] = None,
        bif_args: Optional[BIFArguments] = None,
    ) -> None:
        check_strategy(strategy, "Analyzer(strategy=...)")
        if bif_args is not None and not isinstance(bif_args, BIFArguments):
            raise TypeError(f"`bif_args` must be a BIFArguments, got {type(bif_args).__name__}.")
        if strategy in KRONFLUENCE_STRATEGIES and not tracked_module_names(model):
            raise untracked_error(model, f"Strategy {strategy!r}")
        with untracked_model_allowed(model) as untracked:
            super().__init__(
                analysis_name=analysis_name,
                model=model,
                task=task,
                cpu=cpu,
                log_level=log_level,
                log_main_process_only=log_main_process_only,
                profile=profile,
                disable_tqdm=disable_tqdm,
                output_dir=output_dir,
                disable_model_save=disable_model_save,
            )
        if log_level is not None:
            logger.setLevel(log_level)
        set_main_process_only(log_main_process_only)
        self.strategy = strategy
        self.bif_args = bif_args if bif_args is not None else BIFArguments()
        self.untracked = untracked  # nothing kronfluence can track: only strategy "bif" can run
        self._override_logged = False

    def _require_tracked(self, what: str) -> None:
        """kronfluence's strategies need tracked modules: its own error, plus the sentence that "bif" works."""
        if self.untracked:
            raise untracked_error(self.model, what)

    # ------------------------------------------------------------------ strategy resolution
    def _resolve_factor_args(self, factor_args: Optional[FactorArguments]) -> Optional[FactorArguments]:
        """The Analyzer's `strategy`, when given, wins over the one inside `factor_args`.

        kronfluence's scripts pass an explicit `FactorArguments` (whose default strategy "ekfac" cannot be told
        apart from a chosen one), so `Analyzer(..., strategy="bif")` must be the one flag that switches them.
        """
        if factor_args is not None:
            check_strategy(factor_args.strategy, "FactorArguments.strategy")
        if self.strategy is None:
            return factor_args
        if factor_args is None:
            return FactorArguments(strategy=self.strategy)
        if factor_args.strategy != self.strategy:
            if not self._override_logged:
                logger.info(
                    "Analyzer(strategy=%r) overrides FactorArguments(strategy=%r); the other factor arguments are "
                    "kept.",
                    self.strategy,
                    factor_args.strategy,
                )
                self._override_logged = True
            factor_args = dataclasses.replace(factor_args, strategy=self.strategy)
        return factor_args

    def load_bif_args(self, name: str, scores: bool = False) -> Optional[BIFArguments]:
        """BIF settings recorded in `factors_<name>/` (or `scores_<name>/` when `scores=True`)."""
        folder = storage.scores_dir(self.output_dir, name) if scores else storage.factors_dir(self.output_dir, name)
        path = folder / storage.BIF_ARGUMENTS_FILE
        return BIFArguments.from_dict(storage.load_json(path)) if path.exists() else None

    def _fit_bif(self, factors_name: str, factor_args: FactorArguments, bif_args: Optional[BIFArguments], ow: bool):
        """BIF has nothing to fit: record the strategy and the sampler settings the scores will use."""
        bif_args = bif_args if bif_args is not None else self.bif_args
        folder = storage.factors_dir(self.output_dir, factors_name)

        def record() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            storage.save_or_check_json(folder / storage.FACTOR_ARGUMENTS_FILE, factor_args.to_dict(), "arguments", ow)
            storage.save_or_check_json(
                folder / storage.BIF_ARGUMENTS_FILE, bif_args.to_dict(), "BIF arguments", ow, ignore=RUN_CONTROL_FIELDS
            )

        process_state(self.model).on_main(record)  # one writer; a mismatch raises on every process
        logger.info("Strategy `bif` fits no factors; recorded its arguments at `%s`.", folder)

    # ------------------------------------------------------------------ fit methods
    def fit_all_factors(
        self,
        factors_name: str,
        dataset: data.Dataset,
        per_device_batch_size: Optional[int] = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        factor_args: Optional[FactorArguments] = None,
        overwrite_output_dir: bool = False,
        bif_args: Optional[BIFArguments] = None,
    ) -> None:
        factor_args = self._resolve_factor_args(factor_args)
        if factor_args is not None and factor_args.strategy == "bif":
            return self._fit_bif(factors_name, factor_args, bif_args, overwrite_output_dir)
        self._require_tracked(_strategy_label(factor_args))
        _warn_unused_bif_args(bif_args, factor_args)
        return super().fit_all_factors(
            factors_name=factors_name,
            dataset=dataset,
            per_device_batch_size=per_device_batch_size,
            initial_per_device_batch_size_attempt=initial_per_device_batch_size_attempt,
            dataloader_kwargs=dataloader_kwargs,
            factor_args=factor_args,
            overwrite_output_dir=overwrite_output_dir,
        )

    def _fit_step(self, kronfluence_method, factors_name: str, *args: Any, **kwargs: Any) -> None:
        """A single kronfluence fit method, or the BIF record when the resolved strategy is "bif"."""
        bif_args = kwargs.pop("bif_args", None)
        factor_args = self._resolve_factor_args(kwargs.pop("factor_args", None))
        if factor_args is not None and factor_args.strategy == "bif":
            return self._fit_bif(factors_name, factor_args, bif_args, kwargs.get("overwrite_output_dir", False))
        self._require_tracked(_strategy_label(factor_args))
        _warn_unused_bif_args(bif_args, factor_args)
        return kronfluence_method(factors_name, *args, factor_args=factor_args, **kwargs)

    def fit_covariance_matrices(self, factors_name: str, dataset: data.Dataset, *args: Any, **kwargs: Any) -> None:
        return self._fit_step(super().fit_covariance_matrices, factors_name, dataset, *args, **kwargs)

    def perform_eigendecomposition(self, factors_name: str, *args: Any, **kwargs: Any) -> None:
        return self._fit_step(super().perform_eigendecomposition, factors_name, *args, **kwargs)

    def fit_lambda_matrices(self, factors_name: str, dataset: data.Dataset, *args: Any, **kwargs: Any) -> None:
        return self._fit_step(super().fit_lambda_matrices, factors_name, dataset, *args, **kwargs)

    def load_all_factors(self, factors_name: str) -> Dict[str, Any]:
        factor_args = self.load_factor_args(factors_name)
        if factor_args is not None and factor_args.strategy == "bif":
            return {}
        return super().load_all_factors(factors_name)

    # ------------------------------------------------------------------ score methods
    def _bif_factors(self, factors_name: str):
        """(FactorArguments, BIFArguments) when `factors_name` was fitted with strategy "bif", else None."""
        factor_args = self.load_factor_args(factors_name)
        if factor_args is None or factor_args.strategy != "bif":
            return None
        bif_args = self.load_bif_args(factors_name)
        if bif_args is None:
            raise FactorsNotFoundError(
                f"Factors `{factors_name}` use strategy 'bif' but `{storage.BIF_ARGUMENTS_FILE}` is missing from "
                f"`{storage.factors_dir(self.output_dir, factors_name)}`. Run `fit_all_factors` again."
            )
        return factor_args, bif_args

    def _score_bif(self, request: ScoreRequest, bif) -> Optional[Dict[str, Any]]:
        """The BIF sampling phase, profiled as kronfluence profiles its phases (`Analyzer(profile=True)`)."""
        scorer = BIFScorer(self.model, self.task, self.output_dir, self.disable_tqdm, self.profiler)
        result = scorer.run(request, *bif)
        if result is None:
            self._log_profile_summary(name=f"scores_{request.scores_name}_{request.kind}")
        return result

    def compute_pairwise_scores(
        self,
        scores_name: str,
        factors_name: str,
        query_dataset: data.Dataset,
        train_dataset: data.Dataset,
        per_device_query_batch_size: int,
        per_device_train_batch_size: Optional[int] = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        query_indices: Optional[Sequence[int]] = None,
        train_indices: Optional[Sequence[int]] = None,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        score_args: Optional[ScoreArguments] = None,
        target_data_partitions: Optional[Sequence[int]] = None,
        target_module_partitions: Optional[Sequence[int]] = None,
        overwrite_output_dir: bool = False,
    ):
        bif = self._bif_factors(factors_name)
        if bif is None:
            self._require_tracked(_strategy_label(self.load_factor_args(factors_name)))
            return super().compute_pairwise_scores(
                scores_name=scores_name,
                factors_name=factors_name,
                query_dataset=query_dataset,
                train_dataset=train_dataset,
                per_device_query_batch_size=per_device_query_batch_size,
                per_device_train_batch_size=per_device_train_batch_size,
                initial_per_device_train_batch_size_attempt=initial_per_device_train_batch_size_attempt,
                query_indices=query_indices,
                train_indices=train_indices,
                dataloader_kwargs=dataloader_kwargs,
                score_args=score_args,
                target_data_partitions=target_data_partitions,
                target_module_partitions=target_module_partitions,
                overwrite_output_dir=overwrite_output_dir,
            )
        request = ScoreRequest(
            kind=ScoreKind.PAIRWISE,
            scores_name=scores_name,
            factors_name=factors_name,
            train_dataset=train_dataset,
            query_dataset=query_dataset,
            per_device_query_batch_size=per_device_query_batch_size,
            per_device_train_batch_size=per_device_train_batch_size,
            initial_per_device_train_batch_size_attempt=initial_per_device_train_batch_size_attempt,
            query_indices=query_indices,
            train_indices=train_indices,
            dataloader_params=self._configure_dataloader(dataloader_kwargs),
            score_args=score_args if score_args is not None else ScoreArguments(),
            target_data_partitions=target_data_partitions,
            target_module_partitions=target_module_partitions,
            overwrite_output_dir=overwrite_output_dir,
        )
        return self._score_bif(request, bif)

    def compute_self_scores(
        self,
        scores_name: str,
        factors_name: str,
        train_dataset: data.Dataset,
        per_device_train_batch_size: Optional[int] = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        train_indices: Optional[Sequence[int]] = None,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        score_args: Optional[ScoreArguments] = None,
        target_data_partitions: Optional[Sequence[int]] = None,
        target_module_partitions: Optional[Sequence[int]] = None,
        overwrite_output_dir: bool = False,
    ):
        bif = self._bif_factors(factors_name)
        if bif is None:
            self._require_tracked(_strategy_label(self.load_factor_args(factors_name)))
            return super().compute_self_scores(
                scores_name=scores_name,
                factors_name=factors_name,
                train_dataset=train_dataset,
                per_device_train_batch_size=per_device_train_batch_size,
                initial_per_device_train_batch_size_attempt=initial_per_device_train_batch_size_attempt,
                train_indices=train_indices,
                dataloader_kwargs=dataloader_kwargs,
                score_args=score_args,
                target_data_partitions=target_data_partitions,
                target_module_partitions=target_module_partitions,
                overwrite_output_dir=overwrite_output_dir,
            )
        request = ScoreRequest(
            kind=ScoreKind.SELF,
            scores_name=scores_name,
            factors_name=factors_name,
            train_dataset=train_dataset,
            query_dataset=None,
            per_device_query_batch_size=None,
            per_device_train_batch_size=per_device_train_batch_size,
            initial_per_device_train_batch_size_attempt=initial_per_device_train_batch_size_attempt,
            query_indices=None,
            train_indices=train_indices,
            dataloader_params=self._configure_dataloader(dataloader_kwargs),
            score_args=score_args if score_args is not None else ScoreArguments(),
            target_data_partitions=target_data_partitions,
            target_module_partitions=target_module_partitions,
            overwrite_output_dir=overwrite_output_dir,
        )
        return self._score_bif(request, bif)


def _warn_unused_bif_args(bif_args: Optional[BIFArguments], factor_args: Optional[FactorArguments]) -> None:
    """`bif_args` given to a kronfluence fit would be silently dropped: say so, and how to run BIF instead."""
    if bif_args is not None:
        logger.warning(
            "`bif_args` were passed to a fit with %s; they are ignored and kronfluence fits its factors. To sample "
            'BIF, pass `strategy="bif"` to the Analyzer (or `FactorArguments(strategy="bif")`).',
            _strategy_label(factor_args).lower(),
        )


def _strategy_label(factor_args: Optional[FactorArguments]) -> str:
    return f"Strategy {factor_args.strategy if factor_args is not None else FactorArguments().strategy!r}"


__all__ = ["Analyzer", "STRATEGIES", "logging"]
