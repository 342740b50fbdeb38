"""Datasets and image loading. PIL and torchvision are imported when used."""
