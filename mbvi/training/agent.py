"""The variational EM agent (paper Algorithm 1) as a LightningModule.

Each environment step is followed by ``updates_per_step`` EM updates (a Lightning
"batch" runs several such steps, see ``training_step``):

    E-step   act: a ~ π(a|s,O) from the inference engine (Algorithm 1 lines 6-8)
    M-step   value: soft TD regression of Q̂ (Eq. 9-10)
             engine: maximise J̃ (Eq. 16; Eq. 6-7 over H model steps when the value
                     is model-based) w.r.t. the inference network
             α: keep KL(π‖p) at its target
             model (model-based values, every ``model_every`` env steps): refit the
                     world model to the replay buffer

The budget is counted in environment steps (``env_steps``), never in
``trainer.global_step``, which counts optimizer steps.
"""

from __future__ import annotations

import math
import time
from functools import partial

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from mbvi.planners.base import InferenceEngine
from mbvi.planners.direct import Direct
from mbvi.planners.gradient import GradientRefinement
from mbvi.training import checks
from mbvi.training.acting import Acting
from mbvi.training.callbacks import DeferredInterrupt, EnvStepCheckpoint, EnvStepProgress
from mbvi.training.checkpoints import agent_state, load_agent_state
from mbvi.training.components import build_component, component_params, component_spec
from mbvi.training.m_step import AlphaTarget, TDInference, check_m_step_options, m_step_losses
from mbvi.training.metrics import RunningMeans
from mbvi.training.optim import adam_step, clear_grads, fused_adam
from mbvi.training.replay import ReplayBuffer
from mbvi.training.rng import capture_rng_state, restore_rng_state
from mbvi.training.runner import EnvRunner
from mbvi.training.video import EvalVideos
from mbvi.training.world_fit import WorldFit, refit_due
from mbvi.variational.objectives import TrajectoryObjective
from mbvi.variational.priors import KLForm, Prior, UniformPrior
from mbvi.variational.values import TwinQ, ValueEstimate

ENV_STEPS_PER_BATCH = 8
"""Env steps per Lightning batch (``VariationalAgent.training_step``)."""


class _Ticks(IterableDataset):
    """An endless stream of placeholders: the agent makes its own data."""

    def __iter__(self):
        while True:
            yield 0


class VariationalAgent(Acting, L.LightningModule):
    """Variational RL agent: choose a prior, an inference engine and a value estimate.

    Args:
        env_id: Gymnasium id of an env with Box actions and flat Box observations, or
            "module:EnvId" for an env that `module` registers on import.
        prior: action prior p_θ(a|s); default ``UniformPrior`` (SAC).
        engine: inference engine for π(a|s,O); default ``Direct`` (SAC).
        value: value estimate Q̂(s,a); default ``TwinQ`` (model-free).
        seed: seeds torch, numpy, the envs and replay sampling.
        total_env_steps: training budget in environment steps.
        warmup_steps: env steps with uniformly random actions before updates start.
        batch_size: transitions per update.
        updates_per_step: EM updates per env step once warm-up is over.
        gamma: discount factor γ.
        value_lr: Adam learning rate of the value estimate.
        engine_lr: Adam learning rate of the inference network.
        alpha_lr: Adam learning rate of log α.
        prior_lr: Adam learning rate of a learned prior's parameters.
        init_alpha: initial temperature α (> 0).
        autotune_alpha: tune α towards ``alpha_target`` (else α stays ``init_alpha``).
        target_kl_per_dim: KL target per action dimension; None takes the prior's
            default: 1 + log 2 ≈ 1.69 nats for UniformPrior (SAC's entropy target −A)
            and for ConstantTanhGaussianPrior (the same budget), 0.5 for LearnedPrior
            (an MPO-style step bound, see its ``default_kl_target``).  Read by
            ``alpha_target='kl'`` only.
        alpha_target: what α is tuned towards: ``kl`` keeps KL(π‖p) at
            ``target_kl_per_dim`` · A; ``entropy`` is SAC's procedure (Haarnoja et al.
            2018c), the posterior's entropy at −A whatever the prior, as §4.1 tunes it.
            The two coincide under UniformPrior (docs/fidelity.md).
        kl_form: how Eq. 7's KL terms read a prior of constant density: ``entropy``
            drops its constant log-density, so KL(π‖U) becomes −H(π) and the objective,
            TD target and α are SAC's exactly; ``kl`` keeps Eq. 7's per-step α A log 2,
            which makes an early termination cheaper.  None (default): ``entropy``
            under UniformPrior, ``kl`` under every other prior (``entropy`` is refused
            there: nothing constant to drop).
        td_inference: the critic the TD target's next-state posterior is inferred
            against: ``target`` (the target critic, also used for the backup's values)
            or ``online`` (the critic acting uses).  Only engines whose inference
            reads Q̂ (Iterative, GradientRefinement, planners) tell them apart.
        buffer_size: replay capacity in transitions.
        eval_every: env steps between deterministic (mean-action) evaluations.
        eval_episodes: episodes per evaluation.
        log_every: env steps between metric flushes to the logger.
        checkpoint_every: env steps between checkpoints (a final one is always written).
        checkpoint_dir: folder of checkpoints, one subfolder per MLflow run.
        progress_refresh_s: seconds between progress-bar refreshes; 0 hides the bar.
        gap_every: env steps between measurements of the amortisation gap (J̃ after
            per-state gradient refinement minus J̃ of the engine, logged as
            ``inference/amortisation_gap``); 0 turns it off.
        gap_states: replay states the gap is measured on.
        model_every: env steps between refits of a model-based value's world model
            (the first refit comes when warm-up ends, before the first update).
        compile: run each update's losses (forward and backward) through
            ``torch.compile``.  The first update pays a one-off compile (shorter
            once inductor's on-disk cache holds the graphs); SAC updates then run
            faster on a CPU (figures in docs/performance.md).  Meant for amortised engines
            (``Direct``, ``Iterative``): code that dynamo cannot trace stays eager, and
            engines that run an optimiser or threads inside inference
            (``GradientRefinement``; ``Iterative`` at the paper's sample count) break
            into many graphs that can take minutes to compile.
        video_every: env steps between evaluation videos: one mean-action episode
            rendered offscreen and logged as the MP4 artifact
            ``videos/step_<env step, 8 digits>.mp4`` (docs/videos.md); 0 (default)
            records none.
    """

    def __init__(
        self,
        env_id: str = "Pendulum-v1",
        prior: Prior | None = None,
        engine: InferenceEngine | None = None,
        value: ValueEstimate | None = None,
        seed: int = 0,
        total_env_steps: int = 10_000,
        warmup_steps: int = 1_000,
        batch_size: int = 256,
        updates_per_step: int = 1,
        gamma: float = 0.99,
        value_lr: float = 3e-4,
        engine_lr: float = 3e-4,
        alpha_lr: float = 3e-4,
        prior_lr: float = 3e-4,
        init_alpha: float = 1.0,
        autotune_alpha: bool = True,
        target_kl_per_dim: float | None = None,
        alpha_target: AlphaTarget = "kl",
        kl_form: KLForm | None = None,
        td_inference: TDInference = "target",
        buffer_size: int = 1_000_000,
        eval_every: int = 2_000,
        eval_episodes: int = 5,
        log_every: int = 500,
        checkpoint_every: int = 10_000,
        checkpoint_dir: str = "checkpoints",
        progress_refresh_s: float = 1.0,
        gap_every: int = 0,
        gap_states: int = 64,
        model_every: int = 250,
        compile: bool = False,
        video_every: int = 0,
    ):
        super().__init__()
        checks.check_schedule(locals())
        check_m_step_options(alpha_target, td_inference, target_kl_per_dim)
        prior, engine, value = (build_component(c) for c in (prior, engine, value))
        self.automatic_optimization = False
        L.seed_everything(seed, verbose=False)

        # Before the envs: the renderer's OpenGL backend is chosen before MuJoCo loads.
        self._video = EvalVideos(env_id, video_every, seed) if video_every else None
        self.runner = EnvRunner(env_id, seed)
        self.eval_runner = EnvRunner(env_id, seed + 1)
        obs_dim, act_dim = self.runner.obs_dim, self.runner.act_dim
        self.prior = prior if prior is not None else UniformPrior()
        self.engine = engine if engine is not None else Direct()
        self.value = value if value is not None else TwinQ()
        # Components as config dicts, not objects: checkpoints stay loadable with
        # weights_only=True, and load_from_checkpoint rebuilds these very components.
        self.save_hyperparameters(ignore=["prior", "engine", "value"])
        for name in ("prior", "engine", "value"):
            self.hparams[name] = component_spec(getattr(self, name))
        self.prior.build(obs_dim, act_dim)
        self.prior.set_kl_form(kl_form)
        self.engine.build(obs_dim, act_dim)
        self.value.model_seed = seed
        self.value.build(obs_dim, act_dim, env=self.runner.env)
        checks.check_components(self.prior, self.engine, self.value)
        self.value.bind(self.prior, self.engine, lambda: self.alpha, gamma)
        self.log_alpha = torch.nn.Parameter(torch.tensor(math.log(init_alpha)))
        self.kl_target = checks.kl_target_per_dim(self.prior, target_kl_per_dim) * act_dim

        self.env_steps = 0
        self.last_episode_return = float("nan")
        self.buffer: ReplayBuffer | None = None
        # A planner's warm start, one per env runner: training and evaluation never
        # share one, and each is reset when its episode ends.
        self._plan_states: dict[str, dict | None] = {"train": None, "eval": None}
        self._world_fit = WorldFit(self.value, obs_dim, act_dim, seed)
        self._rng = np.random.default_rng(seed)
        self._metrics = RunningMeans()  # update metrics between flushes
        self._pending_rng: dict | None = None
        self._refiner: GradientRefinement | None = None  # built on first use
        self._clock = (time.perf_counter(), 0)
        self._losses = self._eager_losses
        if compile:
            # Random draws by aten's generator, as in eager mode: inductor's own CPU
            # sampler was slower, and a seeded run draws the same numbers whether it
            # compiles or not.  On CPU-only machines the graph's kernels are called
            # from C++ rather than Python: less per-kernel overhead, for a longer
            # one-off compile (docs/performance.md).
            options = {"fallback_random": True, "cpp_wrapper": not torch.cuda.is_available()}
            self._losses = torch.compile(self._eager_losses, options=options)

    # ---- Lightning plumbing -------------------------------------------------------
    def configure_callbacks(self):
        hp = self.hparams
        # DeferredInterrupt after the checkpoint: an interrupt is raised once the batch's
        # periodic checkpoint is written.
        callbacks = [
            EnvStepCheckpoint(hp.checkpoint_every, hp.checkpoint_dir),
            DeferredInterrupt(),
        ]
        if hp.progress_refresh_s > 0:
            callbacks.append(EnvStepProgress(hp.progress_refresh_s))
        return callbacks

    def configure_optimizers(self):
        hp = self.hparams
        return fused_adam(
            [
                (self.value.td_parameters(), hp.value_lr),
                ([p for p in self.engine.parameters() if p.requires_grad], hp.engine_lr),
                ([self.log_alpha], hp.alpha_lr if hp.autotune_alpha else 0.0),
                ([p for p in self.prior.parameters() if p.requires_grad], hp.prior_lr),
            ]
        )

    def train_dataloader(self):
        # A private generator: a DataLoader iterator draws a seed from torch's global
        # one, which would shift a resumed run's random stream from the checkpoint's.
        return DataLoader(_Ticks(), batch_size=None, generator=torch.Generator())

    def setup(self, stage: str) -> None:
        if self.buffer is None:
            hp = self.hparams
            capacity = min(hp.buffer_size, hp.total_env_steps)
            self.buffer = ReplayBuffer(
                capacity, self.runner.obs_dim, self.runner.act_dim, self.device, seed=hp.seed
            )

    def on_fit_start(self) -> None:
        if self._pending_rng is not None:  # a resumed run
            restore_rng_state(self._pending_rng, self._rng)
            self._pending_rng = None
            # Env internals are not checkpointed: the resumed run starts a fresh episode.
            self.runner.restart(self.hparams.seed + self.env_steps, self.env_steps)
        if self.logger is not None:
            # Lightning logs the agent's own hyperparameters (env_id, seed, ...).
            params = {"kl_target": self.kl_target}
            for name in ("prior", "engine", "value"):
                params.update(component_params(name, getattr(self, name)))
            self.logger.log_hyperparams(params)
        self._clock = (time.perf_counter(), self.env_steps)

    def on_train_end(self) -> None:
        """A model-based run logs its world model's error over the horizon as
        ``model_error_by_horizon.png``."""
        if self.logger is not None and hasattr(self.logger, "run_id"):
            self._world_fit.log_error_figure(self.logger.experiment, self.logger.run_id)

    def run_name(self) -> str:
        """``<engine>-<prior>[-H<horizon>]-seed<seed>``, e.g.
        ``Iterative-ConstantTanhGaussian-seed2`` or ``Direct-Uniform-H3-seed0`` (a
        model-based value of horizon 3): the default MLflow run name, so that a run
        list reads as the design choices."""
        prior = type(self.prior).__name__.removesuffix("Prior") or type(self.prior).__name__
        value = f"-H{self.value.horizon}" if self.value.world_model is not None else ""
        return f"{type(self.engine).__name__}-{prior}{value}-seed{self.hparams.seed}"

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # ---- the EM loop ----------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """Up to ``ENV_STEPS_PER_BATCH`` env steps, each followed by its updates.

        A Lightning batch costs trainer bookkeeping (hooks, fetching, result
        collection), a few percent of a SAC step (docs/performance.md); several env
        steps per batch pay it once.  A batch ends at every
        multiple of ``checkpoint_every``, so that periodic checkpoints land on exact env
        steps, and at the end of the budget.
        """
        hp = self.hparams
        while True:
            self._env_step()
            if self.env_steps >= hp.total_env_steps:
                self.trainer.should_stop = True
                return
            at_checkpoint = self.env_steps % hp.checkpoint_every == 0
            if at_checkpoint or self.env_steps % ENV_STEPS_PER_BATCH == 0:
                return

    def _env_step(self) -> None:
        hp = self.hparams
        self._act_and_store()
        due = refit_due(self.env_steps, hp.warmup_steps, hp.model_every)
        if self.value.world_model is not None and due:
            self.fit_world_model()
        if self.env_steps > hp.warmup_steps and len(self.buffer) >= hp.batch_size:
            for _ in range(hp.updates_per_step):
                batch = self._world_fit.batch(self.buffer, hp.batch_size)
                self._metrics.add(self.update(*batch))
        if self.env_steps % hp.log_every == 0:
            self._flush_metrics()
        if self.env_steps % hp.eval_every == 0 or self.env_steps >= hp.total_env_steps:
            self.run_evaluation()
        if hp.gap_every and self.env_steps % hp.gap_every == 0 and self.env_steps > hp.warmup_steps:
            self.measure_amortisation_gap()
        if self._video is not None and self.env_steps % hp.video_every == 0:
            self.record_video()

    def fit_world_model(self) -> dict[str, float]:
        """Refit the value's world model on the replay buffer (``WorldFit.refit``) and
        log its metrics, stepped by env steps."""
        metrics = self._world_fit.refit(self.buffer, self.env_steps)
        self._log(metrics)
        return metrics

    def objective(self, s: torch.Tensor) -> TrajectoryObjective:
        """J̃ at states ``s`` [B,S] against the value with frozen parameters: what
        acting and inference maximise."""
        return TrajectoryObjective(s, partial(self.value, frozen=True), self.prior, self.alpha)

    def _act_and_store(self) -> None:
        if self.env_steps < self.hparams.warmup_steps:
            policy = lambda obs: self._rng.uniform(-1.0, 1.0, self.runner.act_dim)  # noqa: E731
        else:
            policy = self._policy
        t = self.runner.step(policy, self.env_steps + 1)
        self.buffer.add(t.obs, t.action, t.reward, t.next_obs, t.terminated)
        self.env_steps += 1
        if t.episode_return is not None:
            self._plan_states["train"] = None  # the next episode plans afresh
            self.last_episode_return = t.episode_return
            self._log({"train/episode_return": t.episode_return})

    def update(self, s, a, r, s2, term) -> dict[str, torch.Tensor]:
        """One M-step on a replay batch ``s`` [B,S], ``a`` [B,A], ``r`` [B], ``s2``, ``term``:
        the sum of ``mbvi.training.m_step.m_step_losses`` minimised in one backward pass and one
        Adam step, then the targets' averaging.  Returns detached metric tensors (no
        host sync on the hot path)."""
        # The raw torch optimizer: Lightning's wrapper adds closure and hook calls per step
        # (mbvi trains in fp32 and counts env steps, not trainer.global_step).
        opt = self.optimizers(use_pl_optimizer=False)
        loss, metrics = self._losses(s, a, r, s2, term)
        clear_grads(opt)
        self.manual_backward(loss)
        adam_step(opt)
        self.value.update_target()
        self.prior.update_target()
        return metrics

    def _eager_losses(self, s, a, r, s2, term) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``m_step_losses`` of this agent's parts; ``self._losses`` is this method, or
        this method through ``torch.compile``."""
        return m_step_losses(
            self.value, self.engine, self.prior, self.log_alpha, self.kl_target,
            self.hparams.gamma, s, a, r, s2, term,
            alpha_target=self.hparams.alpha_target, td_inference=self.hparams.td_inference,
        )  # fmt: skip

    # ---- metrics --------------------------------------------------------------------
    def _flush_metrics(self) -> None:
        now, steps = time.perf_counter(), self.env_steps
        t0, s0 = self._clock
        out = {"perf/env_steps_per_s": (steps - s0) / max(now - t0, 1e-9)}
        self._clock = (now, steps)
        out.update(self._metrics.means(self.env_steps))
        self._metrics.reset()
        self._log(out)

    def check_finite(self) -> None:
        """Raise ``NonFiniteError`` if a loss accumulated since the last log or a
        parameter (networks, targets, α) is NaN or Inf: run before every checkpoint, so a
        checkpoint on disk is always one to resume from."""
        self._metrics.means(self.env_steps)
        checks.check_finite_state(self.state_dict(), self.env_steps)

    def _log(self, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.env_steps)

    # ---- checkpoint state beyond the state_dict (see mbvi.training.checkpoints) ------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mbvi"] = agent_state(self, capture_rng_state(self._rng))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_rng = load_agent_state(self, checkpoint["mbvi"])
