"""What a model is made of: expert presets, the diffusion objectives (FM, DDPM) and their math,
the frozen text encoder and latent space. The bottom layer: imports no other package of ours."""
