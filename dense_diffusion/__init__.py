"""dense_diffusion: re-purposing text-to-image diffusion models for dense vision tasks (JAX/NNX)."""
import os

# TensorFlow is used for tf.data only: keep its C++ start-up chatter off the console (a user can
# still set these variables to see it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
