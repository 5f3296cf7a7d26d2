"""DMP interpolation diffusion (Lee et al. 2024): the condition image takes the place of noise.

z_t = sqrt(a_t) y + sqrt(1 - a_t) x (y: the answer, x: the image), v-prediction; inference runs
DDIM from z_T = x (optionally oracle-DDIM, re-building z_{t-1} from the known image).
"""
from __future__ import annotations

from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.paradigms import base
from dense_diffusion.paradigms import onestep


@base.register("dmp")
class DMP(base.Paradigm):
  """Image-to-answer interpolation with v-prediction."""

  @classmethod
  def validate(cls, cfg):
    onestep.deterministic_checks(cfg, ("v_prediction",))

  def training_batch(self, target, cond, key):
    t = base.train_timesteps(key, self.schedule, self.cfg, target.shape[0])
    z_t = objectives.dmp_forward(self.schedule, target, cond, t)
    tgt = objectives.dmp_v_target(self.schedule, target, cond, t)
    return base.TrainingBatch(z_t, t, tgt,
                              base.loss_weight(self.schedule, self.cfg, t, "v_prediction"))

  def sample(self, model, image, cond, task, key):
    del key
    ts, prev = base.sampler_steps(self.schedule, self.cfg)
    return samplers.sample_dmp(base.denoise_fn, self.schedule, cond, ts, prev,
                               oracle=self.cfg.dmp_oracle, model_args=(model, image, task, cond),
                               clip_sample=self.cfg.clip_sample,
                               clip_sample_range=self.cfg.clip_sample_range)
