"""The pixel normalization of every clip the loaders produce (the recipe's mean 0.45 and std 0.225 per channel),
in 0-255 units; what the views pipeline applies and what pictures and baselines undo or repeat."""

MEAN, STD = 0.45 * 255, 0.225 * 255
