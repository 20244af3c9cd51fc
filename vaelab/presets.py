"""Network presets: named sets of option values (`--preset NAME`), which `config.resolve` puts
under what the caller set and the likelihood's recommendations, and over the defaults. A preset
names options of a run and of its model alike (one namespace of option names). Registered in
alphabetical order, the order --help and the errors list them; a plugin adds its own with
`PRESETS.register(name, {...})`."""

from __future__ import annotations

from .registry import Registry

PRESETS = Registry("preset")

# Burda, Grosse & Salakhutdinov (2015), one stochastic layer, with their recipe (their code,
# github.com/yburda/iwae: nnet.py, datasets.py, experiments.py; the paper's section 5): Glorot
# uniform weights and zero biases, the decoder's output bias at the logit of the training
# pixels' mean, every KL term from the draws, Adam (eps 1e-4) at 1e-3 under their schedule
# with batch 20 for 3,280 epochs. docs/models.md says where vaelab departs from their code.
BURDA_RECIPE = dict(
    init="glorot", output_init="data", kl="sampled", optimizer="adam", lr=1e-3, adam_eps=1e-4,
    schedule="burda", batch_size=20, epochs=3280,
)

PRESETS.register("burda1", dict(
    encoder_hidden=(200, 200), decoder_hidden=(200, 200), activation="tanh", z_dim=50,
    **BURDA_RECIPE,
))
# Burda et al.'s two stochastic layers: x -200-200- z1 (100) -100-100- z2 (50), tanh.
PRESETS.register("burda2", dict(
    encoder_hidden=(200, 200), decoder_hidden=(200, 200), activation="tanh", z_dim=100,
    upper_z_dims=(50,), upper_hidden=(100, 100), **BURDA_RECIPE,
))
# Two stride-2 4x4 convolutions (32 and 64 channels) and a dense layer of 256 each way, for
# images whose sides are multiples of 4 (28x28, 32x32), 1 or 3 channels. Adam: the tutorial's
# SGD rate, tuned for the small MLP, is too slow or unstable for the deeper net.
PRESETS.register("conv", dict(
    architecture="conv", conv_channels=(32, 64), encoder_hidden=(256,), decoder_hidden=(256,),
    activation="relu", z_dim=16, optimizer="adam", lr=1e-3,
))
# Top-down hierarchies (--model topdown) after Child's VDVAE (2021; github.com/openai/vdvae:
# hps.py, vae.py): GELU bottleneck blocks, the scaled initialisation (topdown.py), and an average
# of the weights. Small enough for a CPU: width 32, z of 4 channels per layer (VDVAE's CIFAR-10
# model: 384 and 16, with 43 layers); Adam at 1e-3 where VDVAE uses AdamW at 2e-4 (weight decay
# 0.01, beta2 0.9), and an average at 0.999 where VDVAE's is 0.9999 over a million steps.
# docs/topdown.md says why.
TOPDOWN_RECIPE = dict(family="topdown", activation="gelu", optimizer="adam", lr=1e-3, ema=0.999,
                      output_init="data")
# 28x28 grey images, binarized: resolutions 1, 7, 14, 28. Clipping at 200 and skipping above 400,
# as VDVAE sets its thresholds per dataset from the norms it sees: vaelab's loss is per image,
# and these models' norms had a median of 60-80 and a largest of 335 in a first epoch.
PRESETS.register("topdown-mnist", dict(width=32, z_dim=4, blocks=(1, 2, 2, 1), grad_clip=200.0,
                                       skip_threshold=400.0, **TOPDOWN_RECIPE))
# 32x32 RGB images: resolutions 1, 4, 8, 16, 32, and the logistic mixture of PixelCNN++. No
# clipping or skipping: on photo patches the norms rose from about 1e3 to 6e4 in three epochs.
PRESETS.register("topdown-rgb", dict(
    width=32, z_dim=4, blocks=(1, 2, 2, 2, 1), likelihood="logistic-mixture",
    mixture_components=10, **TOPDOWN_RECIPE))
# The tutorial's network: 784-256-128 encoder, z-128-256-784 decoder (the defaults), and its
# initialisation: PyTorch's, the output bias included (a bare `vaelab train` is the notebook).
PRESETS.register("tutorial", dict(
    encoder_hidden=(256, 128), decoder_hidden=(128, 256), activation="relu", z_dim=2,
    output_init="none",
))
# A VQ-VAE for 28x28 or 32x32 images: the conv preset's two stride-2 convolutions (32, 64) down
# to a 7x7 or 8x8 grid of codes of 16 channels, K = 512 codes (the paper's), commitment 0.25 and
# moving averages at 0.99 (its appendix and its authors' Sonnet VectorQuantizerEMA), Adam at
# 1e-3. docs/vq-vae.md says where it departs from the paper's networks.
PRESETS.register("vq-vae", dict(
    family="vq-vae", architecture="conv", conv_channels=(32, 64), z_dim=16, codebook_size=512,
    commitment=0.25, codebook_decay=0.99, activation="relu", optimizer="adam", lr=1e-3,
))
