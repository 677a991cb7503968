"""Analyses of branched models: responses, activity, covariance, gradients, Hessians, decompositions, NAD."""
