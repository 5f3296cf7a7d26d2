"""Flax NNX models (NHWC): `layers` (shared blocks), `attention`, `unet`, `lora`, `vae`,
`text_encoder`, `image_encoder`, `heads`. Import the sub-modules directly; nothing is imported
here so that `import dense_diffusion.models.<x>` stays cheap."""
