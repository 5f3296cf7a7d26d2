"""GenPercept / Lotus-style one-step perception: a fixed timestep, the answer in one pass.

    python -m dense_diffusion.main train --config configs/onestep.py --workdir runs/onestep
    python -m dense_diffusion.main train --config configs/onestep.py:real=1,pred=v_prediction \
        --config.model.pretrained_unet=weights/sd2-unet --config.input.data_dir=/data/tfds ...

The UNet sees concat(x_t, image) at the fixed t = T - 1 and predicts the target directly
(`prediction_type="sample"`) or its v (`"v_prediction"`, with zero-terminal SNR so that t = T - 1
is pure noise and v = -x0, i.e. a direct prediction as well). Evaluation is the same single pass.

`arg`: `real=0` (0: the small synthetic_scenes set-up of configs/demo.py; 1: the real-data,
SD2-size set-up of configs/generalist_pixel128.py), `res` (image size), `pred` (sample |
v_prediction).
"""
from configs import demo
from configs import generalist_pixel128


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, pred="sample")
  if arg.real:
    c = generalist_pixel128.get_config(f"res={arg.res or 128}")
  else:
    c = demo.get_config(f"res={arg.res or 32}")
  c.diffusion.mode = "onestep"
  c.diffusion.prediction_type = arg.pred  # sample | v_prediction.
  c.model.input_residual = arg.pred == "sample"  # restoration as input + correction; x0 only.
  c.diffusion.timestep = None  # None = T - 1 (GenPercept's fixed timestep).
  c.diffusion.num_inference_steps = 1  # one pass.
  c.diffusion.weighting = "none"  # one timestep: nothing to weight.
  c.schedule.rescale_betas_zero_snr = True  # t = T - 1 is pure noise, so v = -x0 there.
  return c
