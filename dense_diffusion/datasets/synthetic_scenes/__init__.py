"""Built-in synthetic dataset: `render_scene` (numpy) and the TFDS builder `synthetic_scenes`."""
from dense_diffusion.datasets.synthetic_scenes.renderer import CATEGORIES
from dense_diffusion.datasets.synthetic_scenes.renderer import CLASS_NAMES
from dense_diffusion.datasets.synthetic_scenes.renderer import label_features
from dense_diffusion.datasets.synthetic_scenes.renderer import NUM_CLASSES
from dense_diffusion.datasets.synthetic_scenes.renderer import render_scene
try:
  import tensorflow_datasets as _tfds
except ImportError:
  # Optional heavy dependency absent on GPU machines (bench/device_check.sh): `readers` imports
  # the renderer through this package; only the TFDS builder needs tfds.
  _tfds = None
if _tfds is not None:
  from dense_diffusion.datasets.synthetic_scenes.synthetic_scenes import SyntheticScenes
  from dense_diffusion.datasets.synthetic_scenes.synthetic_scenes import SyntheticScenesConfig
else:
  def __getattr__(name):
    if name in ("SyntheticScenes", "SyntheticScenesConfig", "synthetic_scenes"):
      raise ModuleNotFoundError(f"dense_diffusion.datasets.synthetic_scenes.{name} needs "
                                "tensorflow_datasets: pip install tensorflow-datasets")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
