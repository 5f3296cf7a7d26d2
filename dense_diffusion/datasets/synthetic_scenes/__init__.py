"""Built-in synthetic dataset: `render_scene` (numpy) and the TFDS builder `synthetic_scenes`."""
from dense_diffusion.datasets.synthetic_scenes.renderer import CATEGORIES
from dense_diffusion.datasets.synthetic_scenes.renderer import CLASS_NAMES
from dense_diffusion.datasets.synthetic_scenes.renderer import label_features
from dense_diffusion.datasets.synthetic_scenes.renderer import NUM_CLASSES
from dense_diffusion.datasets.synthetic_scenes.renderer import render_scene
from dense_diffusion.datasets.synthetic_scenes.synthetic_scenes import SyntheticScenes
from dense_diffusion.datasets.synthetic_scenes.synthetic_scenes import SyntheticScenesConfig
