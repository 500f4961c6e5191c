"""The tiny base model that has learned something: synthetic scenes with compositional captions
(scenes.py), a pixel-space judge of whether an image matches its caption (judge.py), and the recipe that
trains a tiny VAE and denoiser on them (train.py, `make tiny-base`). See docs/tiny-base.md."""
