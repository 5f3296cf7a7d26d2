"""RefCOCO / RefCOCO+ / RefCOCOg builder (configs refcoco_unc, refcoco+_unc, refcocog_umd)."""
from dense_diffusion.datasets.refcoco.refcoco import RefCoco
