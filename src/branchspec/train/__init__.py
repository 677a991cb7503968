"""Training: vectorized toy gradient descent; LightningModules for classification and class transfer."""
