"""Data sets: the 1-D toy sets, image data sets (CIFAR pickle, image trees, tar archives), digits, layered scenes."""
