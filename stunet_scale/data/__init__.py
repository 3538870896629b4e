"""The data path: raw datasets -> prepared store -> sample plan -> patches -> augmentation."""
