"""Branch architectures: the scalar perceptron, the slim ResNet18, the slim StarGAN-v2 generator and its
discriminator, and the learnt diffusion R."""
